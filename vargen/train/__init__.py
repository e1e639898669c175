"""Training: the loop, tasks, previews. Also ``vargen.train(config, **overrides)``.

``vargen.train`` names both this package and the API function :func:`vargen.train.entry.train`
(also ``vargen.api.train``): once any ``vargen.train.*`` module is imported the package is the
attribute, so the package itself is made callable (delegating to the function) and both
spellings train.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from vargen.train.entry import train  # deferred: importing the package stays cheap

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
