# SPDX-License-Identifier: Apache-2.0
"""``python -m autotune``: see ``autotune/tune.py`` and ``autotune/README.md``."""

from .tune import main

raise SystemExit(main())
