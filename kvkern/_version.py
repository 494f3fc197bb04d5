# SPDX-License-Identifier: Apache-2.0
# The one place the base version lives; builds append a local part (+cpu, +cu130).
__version__ = "0.1.0"
