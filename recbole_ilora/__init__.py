"""recbole-ilora: iLoRA (Instance-wise LoRA, Kong et al., NeurIPS 2024) as a RecBole plugin.

Importing the package applies :mod:`recbole_ilora.compat`, which makes RecBole 1.2.1 run on numpy 2,
pandas 3 and torch >= 2.6. Import it before using RecBole directly.
"""

from recbole_ilora import compat

compat.apply()

__version__ = "0.1.0"
