"""Mirror of ``captum.attr`` for the methods fastattr implements."""

__all__: list = []
