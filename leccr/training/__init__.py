"""Training: the loop shared by every method, checkpoints, resume, validation, and torchrun.

train_method(job, cfg, device)   train one method to completion (resumes an unfinished run)
load_trained(method_dir)         the trained model of a method folder, ready to score
"""

from leccr.training.checkpoint import load_trained  # noqa: F401
from leccr.training.loop import TrainJob, TrainResult, train_method  # noqa: F401
