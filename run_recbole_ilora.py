"""Train and test a RecBole or iLoRA-plugin model: ``python run_recbole_ilora.py --help``."""

from recbole_ilora.cli import main

if __name__ == "__main__":
    main()
