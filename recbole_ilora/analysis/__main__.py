"""``python -m recbole_ilora.analysis --checkpoint=PATH [--checkpoint=PATH2] --out=DIR ...``"""

from recbole_ilora.analysis.command import main

main()
