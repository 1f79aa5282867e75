"""A pytest plugin for the Flink venv: any import of Apache Beam fails, so tests that pass under
it show that what they import works without Beam (PyFlink's venv carries an older Beam of its own)."""
import sys


class _NoBeam:
    def find_spec(self, name, path=None, target=None):
        if name == "apache_beam" or name.startswith("apache_beam."):
            raise ImportError(f"{name}: cdpflow.core must not need Apache Beam (this run forbids it)")
        return None


sys.meta_path.insert(0, _NoBeam())
