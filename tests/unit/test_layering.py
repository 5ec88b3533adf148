"""Low-level modules do not import the main job: ProSparse (a sparsification method) and the
quick-mode switch sit below the demo, so importing them never pulls the whole study in."""

import subprocess
import sys


def test_prosparse_and_settings_import_without_the_demo():
    code = ("import sys, workbench.sparsity.prosparse, workbench.settings; "
            "assert 'workbench.demo' not in sys.modules, 'the demo was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
