"""The flex template's entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in deploy/dataflow/Dockerfile).

Google's template launcher runs `python /template/main.py --input=... --warehouse=... <job
options>` in the launcher image, where cdpflow is installed; everything is in the package
(`cdpflow.runners.dataflow`), so this file only calls it and exits with its code.
"""
import logging
import sys

from cdpflow.runners.dataflow import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
