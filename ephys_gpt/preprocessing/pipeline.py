"""Stage 1 then stage 2 from a validated :class:`PreprocessConfig` (what ``ephys-gpt preprocess``
runs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ephys_gpt.locking import FolderLock
from ephys_gpt.preprocessing.config import PreprocessConfig
from ephys_gpt.preprocessing.discovery import discover
from ephys_gpt.preprocessing.result import RunResult
from ephys_gpt.preprocessing.stage1 import find_outputs, run_stage1
from ephys_gpt.preprocessing.stage2 import Stage2Settings, run_stage2

logger = logging.getLogger(__name__)

STAGES = ("stage_1", "stage_2", "both")


@dataclass
class PipelineResult:
    stage1: RunResult | None = None
    stage2: RunResult | None = None
    failed: dict[str, str] = field(default_factory=dict)  # "stage N: name" -> reason

    @property
    def ok(self) -> bool:
        return not self.failed


def stage2_settings(cfg: PreprocessConfig) -> Stage2Settings:
    return Stage2Settings(steps=dict(cfg.preproc_config), chunk_seconds=cfg.chunk_seconds,
                          min_chunk_seconds=cfg.min_chunk_seconds, picks=cfg.picks,
                          bad_channels=cfg.bad_channels)


def run_preprocess(cfg: PreprocessConfig, stage: str = "both", *, verify: bool = False,
                   lock_timeout: float | None = 0.0) -> PipelineResult:
    """Run ``stage`` (``stage_1``, ``stage_2`` or ``both``); failures are collected, not raised.

    Stage 2 reads every ``*_preproc-raw.fif`` under ``<save_folder>/stage1`` (so it also
    picks up stage-1 outputs from earlier runs or other machines) and writes the chunk store
    to ``<save_folder>/chunks``; ``verify`` makes it compare finished sessions' checksums (not
    only their sizes) before skipping them.

    ``save_folder`` is locked for the whole run: another run holding it makes this one wait
    up to ``lock_timeout`` seconds (None: as long as it takes), then raise
    :class:`~ephys_gpt.locking.FolderLockedError` naming the holder.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    with FolderLock(cfg.save_folder, timeout=lock_timeout, what="save_folder"):
        return _run_locked(cfg, stage, verify)


def _run_locked(cfg: PreprocessConfig, stage: str, verify: bool) -> PipelineResult:
    result = PipelineResult()
    if stage in ("stage_1", "both"):
        recordings = discover(cfg.data_path, cfg.dataset, exclude=[cfg.save_folder])
        result.stage1 = run_stage1(recordings, cfg.stage1_dir, osl_config=cfg.osl_config,
                                   recipe=cfg.recipe, n_workers=cfg.n_workers,
                                   dask_scheduler=cfg.dask_scheduler,
                                   gen_report=cfg.gen_report, progress=cfg.progress)
        result.failed.update({f"stage 1: {k}": v for k, v in result.stage1.failed.items()})
    if stage in ("stage_2", "both"):
        inputs = find_outputs(cfg.stage1_dir)
        if not inputs:
            raise FileNotFoundError(f"no stage-1 outputs (*_preproc-raw.fif) under "
                                    f"{cfg.stage1_dir}; run stage_1 first")
        result.stage2 = run_stage2(inputs, cfg.chunks_dir, stage2_settings(cfg),
                                   n_workers=cfg.n_workers, progress=cfg.progress, verify=verify,
                                   dask_scheduler=cfg.dask_scheduler)
        result.failed.update({f"stage 2: {k}": v for k, v in result.stage2.failed.items()})
    return result


def summarize(result: PipelineResult, cfg: PreprocessConfig) -> str:
    parts = []
    if result.stage1 is not None:
        parts.append(f"stage 1: {result.stage1.counts()} -> {cfg.stage1_dir}")
    if result.stage2 is not None:
        parts.append(f"stage 2: {result.stage2.counts()} -> {Path(cfg.chunks_dir)}")
    return "; ".join(parts)
