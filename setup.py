"""Everything is in pyproject.toml but one file: qwen_jax_lm_eval.pth, which must land in
site-packages itself (it registers the lm-eval backend, see qwen_jax_lm_eval.py). A data file
is installed relative to the environment's prefix, in wheels and editable installs alike."""

import os
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution


class _Distribution(Distribution):
    def has_data(self) -> bool:
        # setuptools' editable_wheel installs data files only when `has_data()` says so, a
        # method Distribution does not define (it has has_data_files)
        return self.has_data_files()


paths = sysconfig.get_paths()
site_packages = os.path.relpath(paths["purelib"], paths["data"])
setup(distclass=_Distribution, data_files=[(site_packages, ["qwen_jax_lm_eval.pth"])])
