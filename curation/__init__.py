"""curation: a distributed multimodal data-curation pipeline on Ray.

Public surface: :func:`load_config` and :class:`PipelineConfig` (recipes), :class:`Run` (run a pipeline on a
run directory), the stage registry :data:`curation.stages.STAGES`. Heavy dependencies (Ray, torch, img2dataset)
are imported by the functions that need them.
"""

from curation.config import ConfigError, PipelineConfig, load_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "PipelineConfig", "Run", "load_config", "__version__"]


def __getattr__(name: str):
    if name == "Run":
        from curation.runner import Run

        return Run
    raise AttributeError(name)
