"""NoiseTunnel (SmoothGrad of IntegratedGradients) where Captum's memory grows with the copies.

    fastattr bench --cases benchmarks/cases/noise_tunnel.py --batch-sizes 1,4,8 --n-steps 20

Captum attributes all ``nt_samples * B`` noisy copies at every step at once: ``n_steps *
nt_samples * B`` rows of activations. fastattr streams copies and steps through its path
engine in chunks, so its peak stays at the chunk budget. Both libraries draw the same noise
(each call seeds torch's generators), so their results are compared as usual.
"""

from fastattr.bench import models
from fastattr.bench.cases import TARGET, Case, images, noise_tunnel
from fastattr.bench.floors import noise_floor

CASES = (
    Case(
        "NoiseTunnel", "cnn", models.cnn, images, noise_floor, construct=noise_tunnel,
        call_kwargs={"target": TARGET, "nt_samples": 20, "stdevs": 0.1},
    ),
    Case(
        "NoiseTunnel", "resnet", models.resnet, images, noise_floor, construct=noise_tunnel,
        call_kwargs={"target": TARGET, "nt_samples": 20, "stdevs": 0.1},
    ),
)  # fmt: skip
