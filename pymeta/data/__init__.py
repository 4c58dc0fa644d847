"""Episodic data: the :class:`Episode` batch, task and sequence samplers, few-shot datasets."""

from pymeta.data.episode import Episode
from pymeta.data.folder import ImageFolderClasses
from pymeta.data.glyphs import Glyphs
from pymeta.data.sampler import TaskSampler
from pymeta.data.sequences import Sequences, SequenceSampler
from pymeta.data.sinusoid import Sinusoid, SinusoidTasks

__all__ = [
    "Episode", "Glyphs", "ImageFolderClasses", "SequenceSampler", "Sequences", "Sinusoid", "SinusoidTasks", "TaskSampler",
]
