"""The two tables the rest of the compiler looks ops up in.

LOWERINGS: ATen overload -> function(ctx, node, *args, **kwargs) returning the value(s) of the
           node (a View, a python scalar, or a tuple of them). Each ops/ module registers its
           own entries with @lowers.
FAMILIES:  op kind -> OpFamily instance.
"""

LOWERINGS: dict = {}
FAMILIES: dict = {}


def lowers(*targets):
    def register(fn):
        for t in targets:
            LOWERINGS[t] = fn
        return fn

    return register


def family(cls):
    FAMILIES[cls.kind] = cls()
    return cls


def load_all():
    """Import every op module so their table entries exist."""
    from mkcompiler.ops import attention, comm, elementwise, embedding, layout, matmul, norm, reduce, scatter  # noqa: F401
