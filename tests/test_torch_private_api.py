"""The private torch APIs fastattr relies on: each still exists and still means what fastattr
takes it to mean. A failure here names the API that moved; the comment at its use in fastattr
says what it is for and which torch versions it was checked on.

Checked by `make test` on the torch of the main venv and on the oldest torch pyproject.toml
claims (`make test-oldest-torch`).
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from torch.autograd import Variable


def test_the_engine_runs_backward_with_the_arguments_fastattr_passes():
    # fastattr/_autograd.py: Variable._execution_engine.run_backward(tensors, grad_tensors,
    # keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad).
    weight = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(2, dtype=torch.float64, requires_grad=True)
    output = x @ weight
    seed = torch.randn_like(output)
    grads = Variable._execution_engine.run_backward(
        (output,), (seed,), False, False, (x, unused), True, False
    )
    assert isinstance(grads, tuple) and len(grads) == 2
    torch.testing.assert_close(grads[0], seed @ weight.T, rtol=0, atol=1e-12)
    assert grads[1] is None  # allow_unreachable: an unused input gets None
    assert x.grad is None  # accumulate_grad=False: nothing lands in .grad
    with pytest.raises(RuntimeError):  # keep_graph=False freed the graph
        output.sum().backward()


def test_a_tensors_version_counts_in_place_writes_and_is_shared_by_its_views():
    # fastattr/lrp/propagation.py compares tensor._version with the one noted when a rule's
    # output was made: a product folds into that rule's ratio only if nothing wrote into it.
    x = torch.randn(3)
    version = x._version
    view = x.view_as(x)
    assert view._version == version
    view.add_(1.0)
    assert x._version == view._version > version
    x.clone().add_(1.0)
    assert x._version == view._version


def test_autograd_nodes_lead_to_the_leaves_they_accumulate_into():
    # fastattr/lrp/propagation.py (Relevance.is_activation) walks grad_fn.next_functions and
    # reads an AccumulateGrad node's .variable to tell whether a tensor depends on the inputs.
    leaf = torch.randn(3, requires_grad=True)
    weight = nn.Parameter(torch.randn(3))
    out = (leaf * 2 + weight[:3]).sum()
    found, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        found.append(getattr(node, "variable", None))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    assert any(v is leaf for v in found) and any(v is weight for v in found)
    assert out.grad_fn.next_functions[0][0] is out.grad_fn.next_functions[0][0]  # one wrapper


def test_children_and_buffers_live_in_modules_and_buffers():
    # fastattr/lrp reads module._modules (children by name, in order) and module._buffers.
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    assert list(model._modules) == ["0", "1"] and model._modules["1"] is model[1]
    assert set(model[1]._buffers) == {"running_mean", "running_var", "num_batches_tracked"}
    assert not model[0]._buffers


@pytest.mark.parametrize("cls, shape", [(nn.Conv1d, (2, 3, 9)), (nn.Conv2d, (2, 3, 9, 8))])
def test_conv_forward_takes_the_weight_and_bias_to_use(cls, shape):
    # fastattr/lrp/rules.py: module._conv_forward(x, weight, bias) recomputes a convolution
    # with modified weights and the module's own padding mode, stride, dilation and groups.
    module = cls(3, 6, 3, stride=2, padding=1, dilation=1, groups=3, padding_mode="circular")
    x = torch.randn(*shape)
    weight, bias = module.weight.detach() * 2, torch.zeros(6)
    expected = cls(3, 6, 3, stride=2, padding=1, groups=3, padding_mode="circular")
    with torch.no_grad():
        expected.weight.copy_(weight)
        expected.bias.zero_()
    torch.testing.assert_close(module._conv_forward(x, weight, bias), expected(x))


def test_output_padding_recovers_what_the_output_size_pinned():
    # fastattr/lrp/rules.py: module._output_padding(input, output_size, stride, padding,
    # kernel_size, num_spatial_dims, dilation) gives the output padding of a transposed
    # convolution that produced `output_size`.
    module = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)
    x = torch.randn(1, 2, 5, 5)
    for size in ([9, 9], [10, 10]):
        output = module(x, output_size=size)
        padding = module._output_padding(
            x, size, module.stride, module.padding, module.kernel_size, 2, module.dilation
        )
        assert list(padding) == [size[0] - 9, size[1] - 9]
        assert list(output.shape[-2:]) == size


@pytest.mark.parametrize(
    "base, public",
    [
        (nn.modules.conv._ConvNd, [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d]),
        (nn.modules.pooling._AvgPoolNd, [nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d]),
        (nn.modules.pooling._MaxPoolNd, [nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d]),
        (nn.modules.pooling._AdaptiveAvgPoolNd, [nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d]),
        (nn.modules.pooling._AdaptiveMaxPoolNd, [nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d]),
        (nn.modules.batchnorm._BatchNorm, [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]),
        (nn.modules.dropout._DropoutNd, [nn.Dropout, nn.Dropout2d, nn.AlphaDropout]),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_the_private_base_classes_lrp_matches_on_still_cover_the_public_ones(base, public):
    # fastattr/lrp/rules.py picks default rules by isinstance against these private bases.
    for cls in public:
        assert issubclass(cls, base), f"{cls.__name__} no longer derives from {base.__name__}"


def test_a_hook_removed_from_its_dict_is_gone():
    # fastattr/attr/_layers.py removes its layer hooks by popping their entries from
    # module._forward_hooks / _forward_pre_hooks (found by identity, so that a hook whose
    # handle an interrupt lost is removed too); a plain registration adds to no other dict.
    module = nn.Linear(2, 2)
    calls = []
    hooks = [lambda *a: calls.append("post"), lambda *a: calls.append("pre")]
    module.register_forward_hook(hooks[0])
    module.register_forward_pre_hook(hooks[1])
    assert not module._forward_hooks_with_kwargs and not module._forward_hooks_always_called
    assert not module._forward_pre_hooks_with_kwargs
    for registry, hook in (
        (module._forward_hooks, hooks[0]),
        (module._forward_pre_hooks, hooks[1]),
    ):
        (key,) = [k for k, value in registry.items() if value is hook]
        registry.pop(key)
    module(torch.randn(1, 2))
    assert calls == []


def test_batch_norm_uses_batch_statistics_when_training_or_without_running_ones():
    # fastattr/_model_state.py (uses_batch_statistics): a _BatchNorm normalizes with the batch's
    # statistics in training mode, or when it keeps no running statistics (running_mean None).
    x = torch.randn(6, 3, dtype=torch.float64)
    for module in (nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False).eval()):
        module = module.double()
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        both = module(x)
        torch.testing.assert_close(
            module(x[:3]), (x[:3] - x[:3].mean(0)) / x[:3].var(0, unbiased=False).add(1e-5).sqrt()
        )
        assert not torch.allclose(both[:3], module(x[:3]))
    assert nn.BatchNorm1d(3, track_running_stats=False).running_mean is None
    assert issubclass(nn.SyncBatchNorm, nn.modules.batchnorm._BatchNorm)


def test_a_buffer_put_back_in_buffers_is_the_modules_buffer_again():
    # fastattr/_model_state.py restores a buffer a forward replaced by assigning the original
    # tensor to module._buffers[name].
    module = nn.BatchNorm1d(3)
    original = module.running_mean
    module.running_mean = torch.ones(3)
    module._buffers["running_mean"] = original
    assert module.running_mean is original
    assert dict(module.named_buffers())["running_mean"] is original


def test_a_dispatch_mode_sees_each_aten_op_once_with_its_overload_packet_and_views_bases():
    # fastattr/_exact.py: a TorchDispatchMode (torch.utils._python_dispatch) sees every aten op
    # that runs on tensors, below autograd, once: what its handler runs is not seen again.
    # func.overloadpacket groups an op's overloads (its __name__ ends with "_" for in-place
    # ops), func.__name__ ends with the overload's name, and a view made under the mode has
    # the viewed tensor as its _base.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[object, str, str]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append((func.overloadpacket, func.overloadpacket.__name__, func.__name__))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 3, 4, 4)
    conv = nn.Conv2d(3, 3, 3)
    with torch.no_grad(), Seen() as mode:
        h = conv(x)
        h.relu_()
        view = h[:, :2]
        h.max(1)
    packets = [packet for packet, _, _ in mode.calls]
    assert packets.count(torch.ops.aten.convolution) == 1
    assert (torch.ops.aten.relu_, "relu_", "relu_.default") in mode.calls
    assert (torch.ops.aten.max, "max", "max.dim") in mode.calls
    assert view._base is h


def test_grad_mode_is_set_by_a_builtin():
    # fastattr/_model_state.py (kept_buffers) restores grad mode with torch._C._set_grad_enabled,
    # a builtin (no Python frame an interrupt could stop), read back by torch.is_grad_enabled.
    assert isinstance(torch._C._set_grad_enabled, types.BuiltinFunctionType)
    assert isinstance(torch.is_grad_enabled, types.BuiltinFunctionType)
    with torch.no_grad():
        torch._C._set_grad_enabled(True)
        assert torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    assert not torch.is_grad_enabled()
    torch._C._set_grad_enabled(True)
    assert torch.is_grad_enabled()


def test_torch_functions_in_python_dispatch_through_their_modules_has_torch_function():
    # fastattr/lrp/attention.py (OpenRule.body) runs a torch function written in Python, such
    # as F.multi_head_attention_forward, with has_torch_function replaced in a copy of its
    # globals, so that its first step no longer hands the call to the torch-function modes.
    func = torch.nn.functional.multi_head_attention_forward
    assert func.__globals__["has_torch_function"] is torch.overrides.has_torch_function
    assert "has_torch_function" in func.__code__.co_names
    seen = []

    class Seen(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, f, types, args=(), kwargs=None):
            seen.append(f)
            return f(*args, **(kwargs or {}))

    namespace = dict(func.__globals__)
    namespace["has_torch_function"] = lambda _: False
    body = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    attention = nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 1, 4)
    arguments = (x, x, x, 4, 2, attention.in_proj_weight, attention.in_proj_bias)
    arguments += (None, None, False, 0.0, attention.out_proj.weight, attention.out_proj.bias)
    with Seen():
        body(*arguments)
    assert func not in seen and seen  # the body's own calls reach the mode, not the function
    seen.clear()
    with Seen():
        func(*arguments)
    assert seen[0] is func


def test_global_module_hooks_live_in_the_global_dicts_until_removed():
    # tests/test_lrp_flow.py and tests/test_integrated_gradients.py check that no global hook
    # is left behind by counting the entries of torch.nn.modules.module._global_*_hooks, the
    # dicts register_module_forward_(pre_)hook (used by fastattr/lrp/propagation.py) fill.
    from torch.nn.modules import module as module_hooks

    dicts = (module_hooks._global_forward_pre_hooks, module_hooks._global_forward_hooks)
    before = [len(d) for d in dicts]
    handles = [
        module_hooks.register_module_forward_pre_hook(lambda *a: None),
        module_hooks.register_module_forward_hook(lambda *a: None),
    ]
    assert [len(d) for d in dicts] == [n + 1 for n in before]
    for handle in handles:
        handle.remove()
    assert [len(d) for d in dicts] == before
    assert isinstance(module_hooks._global_backward_hooks, dict)
    assert isinstance(module_hooks._global_backward_pre_hooks, dict)


def test_the_current_function_mode_is_the_top_of_the_stack():
    # fastattr/lrp/propagation.py takes its op-rule mode off torch's stack when an interrupt cut
    # its with statement short: only if torch.overrides._get_current_function_mode() is it.
    from torch.overrides import TorchFunctionMode, _get_current_function_mode

    outer, inner = TorchFunctionMode(), TorchFunctionMode()
    assert _get_current_function_mode() is None
    with outer:
        assert _get_current_function_mode() is outer
        inner.__enter__()
        assert _get_current_function_mode() is inner
        inner.__exit__(None, None, None)
        assert _get_current_function_mode() is outer
    assert _get_current_function_mode() is None


def test_popping_the_torch_function_stack_takes_the_top_mode_off():
    # fastattr/lrp/propagation.py (_finish_suspended_withs) takes its op-rule mode off the stack
    # with torch._C._pop_torch_function_stack once torch's own suspended exits put it back.
    from torch.overrides import TorchFunctionMode, _get_current_function_mode

    mode = TorchFunctionMode()
    torch._C._push_on_torch_function_stack(mode)
    assert _get_current_function_mode() is mode
    assert torch._C._pop_torch_function_stack() is mode
    assert _get_current_function_mode() is None


def test_disabling_torch_function_skips_function_modes_until_the_block_ends():
    # fastattr/lrp/propagation.py runs LRP's module hooks under torch._C.DisableTorchFunction,
    # so that the rules' own torch calls skip its op-rule mode; the mode sees calls again after.
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, requires_grad=True)
    with Seen() as mode:
        x.detach()
        assert mode.calls == 1
        with torch._C.DisableTorchFunction():
            x.detach(), x.dim(), x.requires_grad, torch.add(x, 1)
        assert mode.calls == 1
        x.detach()
        assert mode.calls == 2


def test_the_torch_function_state_read_before_a_disabling_block_turns_it_back_on():
    # fastattr/lrp/propagation.py's engine reads the thread's torch function state before the
    # forward and sets it back after, in case an interrupt cut a DisableTorchFunction block's
    # exit short.
    state = torch._C._get_torch_function_state()
    assert torch._C._is_torch_function_enabled()
    disabling = torch._C.DisableTorchFunction()
    disabling.__enter__()  # never left, as after such an interrupt
    assert not torch._C._is_torch_function_enabled()
    torch._C._set_torch_function_state(state)
    assert torch._C._is_torch_function_enabled()


def test_a_compiled_module_wraps_the_module_as_orig_mod():
    # fastattr/_compiled.py (uncompiled): torch.compile(module) returns an OptimizedModule
    # holding the module as _orig_mod; LRP runs that module instead of the wrapper.
    from torch._dynamo.eval_frame import OptimizedModule

    model = nn.Linear(2, 2)
    compiled = torch.compile(model, backend="eager")
    assert isinstance(compiled, OptimizedModule)
    assert compiled._orig_mod is model
