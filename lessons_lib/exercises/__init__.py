"""Checkers for the chapters' exercises: ``check_<name>(fn)`` grades a learner's function on
cases the learner cannot see. Success prints ``all N checks passed``; a failure raises
:class:`CheckFailed` saying which input failed, what was expected and what came back.
Nothing else in lessons_lib imports this package."""

from ._core import Case, CheckFailed, run_cases  # noqa: F401
from .ch01 import *  # noqa: F401,F403
from .ch02 import *  # noqa: F401,F403
from .ch03 import *  # noqa: F401,F403
from .ch04 import *  # noqa: F401,F403
from .ch05 import *  # noqa: F401,F403
from .ch06 import *  # noqa: F401,F403
from .ch07 import *  # noqa: F401,F403
from .ch08 import *  # noqa: F401,F403
from .ch09 import *  # noqa: F401,F403
from .ch10 import *  # noqa: F401,F403
from .ch11 import *  # noqa: F401,F403
from .ch12 import *  # noqa: F401,F403
from .ch13 import *  # noqa: F401,F403
from .ch14 import *  # noqa: F401,F403
from .ch15 import *  # noqa: F401,F403
from .ch16 import *  # noqa: F401,F403
from .ch17 import *  # noqa: F401,F403
