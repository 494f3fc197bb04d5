# SPDX-License-Identifier: Apache-2.0
"""kvkern's tuner and tuning database (see README.md here).

``python -m autotune --op <op> ...`` times every candidate config on this device
and writes ``configs/<op>/device=<DEVICE>,<static keys>.json``; the run-time side
is ``kvkern.tuning``. The tuner lives in ``autotune.tune`` (imported on use, so
importing this package stays cheap).
"""
