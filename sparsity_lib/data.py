"""The book's data sets: small, generated or shipped with a package, never downloaded, held in memory.

Every data set is a :class:`Task`: train and test tensors plus what a model needs to know about them. The
tasks are small enough that a whole epoch is a handful of in-memory tensor slices, so there is no
``DataLoader`` (its per-batch overhead would dominate the training of these tiny models)::

    task = sl.data.digits(seed=0)                  # 1347 train / 450 test images of 8x8 digits
    for inputs, targets in task.batches(64, seed=0):
        ...
    images = task.reshaped((1, 8, 8))              # the same task, shaped for a CNN

Three tasks are used throughout the book:

* :func:`digits`: scikit-learn's handwritten digits (the chapters' "MNIST");
* :func:`mnist1d`: the procedurally generated MNIST-1D of Greydanus {cite}`greydanus2020scaling`;
* :func:`teacher_student`: Gaussian inputs labelled by a random teacher network (the ground truth is known).

Survey §8 (benchmarks): the survey's experiments use MNIST, CIFAR and ImageNet; these are their laptop-sized
stand-ins. Defined for Chapter 01, used by every chapter.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import config

Batch = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation
def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1), got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1) (exclusive), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------- Task
@dataclass
class Task:
    """A classification task held in memory: ``x_*`` float32 inputs, ``y_*`` int64 class labels.

    Attributes:
        name: short name ("digits", "mnist1d", "teacher_student").
        x_train, y_train, x_test, y_test: tensors; ``x`` has shape ``(N, *input_shape)``, ``y`` shape ``(N,)``.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        description: one line saying where the data come from and how they were prepared.
        meta: anything else worth keeping (e.g. the teacher network of :func:`teacher_student`).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    description: str = ""
    meta: Dict = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def input_shape(self) -> Tuple[int, ...]:
        """Shape of one input, e.g. ``(64,)`` for digits or ``(1, 8, 8)`` after :meth:`reshaped`."""
        return tuple(self.x_train.shape[1:])

    @property
    def in_features(self) -> int:
        """Number of input features (the product of :attr:`input_shape`): the fan-in of a first Linear layer."""
        return int(math.prod(self.input_shape))

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def split(self, split: str) -> Batch:
        """``(x, y)`` of ``split`` ("train" or "test")."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def num_batches(self, batch_size: int, split: str = "train", drop_last: bool = False) -> int:
        """Number of batches in one epoch of ``split`` (what :meth:`batches` returns)."""
        batch_size = _check_int(batch_size, "batch_size")
        n = self.split(split)[0].shape[0]
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    # -------------------------------------------------------------------------------------------- batches
    def batches(self, batch_size: int = 64, *, seed: Optional[int] = None,
                generator: Optional[torch.Generator] = None, split: str = "train", shuffle: bool = True,
                drop_last: bool = False) -> List[Batch]:
        """One epoch of ``split`` as a list of ``(inputs, targets)`` batches.

        The order is a ``torch.randperm`` drawn from ``generator`` (which advances, so that successive epochs
        differ), or from a fresh generator seeded with ``seed`` (default 0); the global RNG is never used. The
        data are gathered once in the new order and then sliced, so a batch is a view and an epoch costs one
        copy of the split. ``shuffle=False`` keeps the stored order. The last batch is smaller when
        ``batch_size`` does not divide the split, unless ``drop_last``.
        """
        batch_size = _check_int(batch_size, "batch_size")
        x, y = self.split(split)
        if shuffle:
            if generator is None:
                generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            x, y = x[order], y[order]
        out = list(zip(x.split(batch_size), y.split(batch_size)))
        if drop_last and out and out[-1][1].shape[0] < batch_size:
            out.pop()
        return out

    def calibration(self, num_samples: int = 256, batch_size: int = 64, seed: int = 0) -> List[Batch]:
        """A random subset of ``num_samples`` training examples in batches: the ``data`` of data-driven pruning.

        E.g. ``sl.prune(model, 0.9, method="snip", data=task.calibration(256))``. The subset is fixed by
        ``seed`` (a ``torch.Generator``); ``num_samples`` larger than the training set gives all of it.
        """
        num_samples = _check_int(num_samples, "num_samples")
        batch_size = _check_int(batch_size, "batch_size")
        generator = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(self.n_train, generator=generator)[:num_samples].to(self.x_train.device)
        x, y = self.x_train[order], self.y_train[order]
        return list(zip(x.split(batch_size), y.split(batch_size)))

    # ----------------------------------------------------------------------------------------- transforms
    def reshaped(self, shape: Sequence[int]) -> "Task":
        """The same task with every input reshaped to ``shape`` (e.g. ``(1, 8, 8)`` for a 2-D CNN on digits).

        The tensors are views of the original ones; ``shape`` must hold exactly :attr:`in_features` values.
        """
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != self.in_features:
            raise ValueError(f"shape {shape} holds {math.prod(shape)} values; inputs have {self.in_features} "
                             f"(input_shape {self.input_shape})")
        return replace(self, x_train=self.x_train.reshape(self.n_train, *shape),
                       x_test=self.x_test.reshape(self.n_test, *shape), meta=dict(self.meta))

    def to(self, device) -> "Task":
        """The same task with its tensors on ``device`` (itself if they already are)."""
        device = torch.device(device)
        if self.x_train.device == device:
            return self
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device), meta=dict(self.meta))

    def __repr__(self) -> str:
        return (f"Task({self.name!r}: {self.n_train} train / {self.n_test} test, input_shape={self.input_shape}, "
                f"{self.num_classes} classes)")


def _as_task(name, x_train, y_train, x_test, y_test, num_classes, description, meta=None) -> Task:
    def tensor(a, dtype):  # np.array copies, so the task never shares memory with a cached array
        return torch.from_numpy(np.array(a, dtype=dtype))

    return Task(name=name, x_train=tensor(x_train, np.float32), y_train=tensor(y_train, np.int64),
                x_test=tensor(x_test, np.float32), y_test=tensor(y_test, np.int64),
                num_classes=int(num_classes), description=description, meta=meta or {})


# -------------------------------------------------------------------------------------------------- digits
def digits(test_fraction: float = 0.25, seed: int = 0) -> Task:
    """Handwritten digits: 1797 grey 8x8 images of the digits 0-9, flattened to 64 features.

    Source: ``sklearn.datasets.load_digits`` (the UCI optical-recognition data set, shipped inside
    scikit-learn, nothing is downloaded). Split: stratified by class with ``sklearn``'s ``train_test_split``
    (``random_state=seed``); the default ``test_fraction=0.25`` gives 1347 train / 450 test examples.
    Features are standardized with the *training* statistics, :math:`x' = (x - \\mu_{train}) / \\max(\\sigma_{train}, 1)`:
    pixel intensities run from 0 to 16, and the floor of one intensity level keeps nearly constant border
    pixels from being blown up. Input shape ``(64,)`` (``task.reshaped((1, 8, 8))`` for a CNN), 10 classes.

    The book's stand-in for MNIST, on which LeNet-300-100 was pruned by Han et al. {cite}`han2015learning`
    (survey §8); a dense MLP reaches 96-97% test accuracy in a few seconds.
    """
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    _check_int(seed, "seed", minimum=0)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    mean = x_train.mean(axis=0)
    std = np.maximum(x_train.std(axis=0), 1.0)
    return _as_task("digits", (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, 10,
                    f"sklearn load_digits, 8x8 images, stratified split test_fraction={test_fraction}, "
                    f"seed={seed}, standardized with train statistics")


# ------------------------------------------------------------------------------------------------- mnist1d
@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(seed: int, num_samples: int, train_split: float):
    """Generate MNIST-1D once per (seed, size, split); numpy's and Python's global RNGs are left untouched."""
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = train_split
    np_state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset reseeds numpy's and Python's global RNGs: restore them afterwards
        data = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = tuple(np.array(data[k]) for k in ("x", "y", "x_test", "y_test"))
    for a in arrays:
        a.setflags(write=False)
    return arrays


def mnist1d(num_samples: Optional[int] = None, seed: int = 0, test_fraction: float = 0.2) -> Task:
    """MNIST-1D {cite}`greydanus2020scaling`: 1-D signals of length 40 drawn from templates of the 10 digits.

    Source: the ``mnist1d`` package's generator (``mnist1d.data.make_dataset`` with the default arguments of
    ``get_dataset_args``: random padding, translation, scaling, shear, correlated and i.i.d. noise), run
    locally with ``args.seed = seed``; nothing is downloaded. ``num_samples`` examples in total (default
    4000 at FAST scale, 10000 at FULL scale; the generator makes ``num_samples // 10`` per class), the last
    ``test_fraction`` of the shuffled examples form the test set (default: 3200 train / 800 test at FAST
    scale). The generator standardizes all signals with one global mean and standard deviation. Input shape
    ``(40,)``, 10 classes; unlike :func:`digits`, a linear model does poorly (about 30%) and a small CNN clearly
    beats an MLP, which makes it a good small benchmark of inductive bias (Greydanus, 2020).

    Generation takes a second or two and is cached in memory per ``(seed, num_samples, test_fraction)``.
    """
    if num_samples is None:
        num_samples = config.pick(fast=4000, full=10000)
    num_samples = _check_int(num_samples, "num_samples", minimum=20)
    seed = _check_int(seed, "seed", minimum=0)
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    x_train, y_train, x_test, y_test = _mnist1d_arrays(seed, num_samples, 1.0 - test_fraction)
    if len(y_test) == 0 or len(y_train) == 0:
        raise ValueError(f"num_samples={num_samples} with test_fraction={test_fraction} leaves an empty split")
    return _as_task("mnist1d", x_train, y_train, x_test, y_test, 10,
                    f"mnist1d generator (Greydanus 2020), num_samples={num_samples}, seed={seed}, "
                    f"test_fraction={test_fraction}")


# ----------------------------------------------------------------------------------------- teacher-student
def teacher_student(n_train: int = 2000, n_test: int = 1000, in_features: int = 20, hidden: int = 32,
                    num_classes: int = 4, teacher_sparsity: float = 0.0, seed: int = 0) -> Task:
    """Teacher-student classification: Gaussian inputs labelled by a random teacher network.

    Inputs :math:`x \\sim \\mathcal{N}(0, I_d)` with ``d = in_features``; labels
    :math:`y = \\arg\\max_k\\, [W_2 \\tanh(W_1 x) - c]_k` where the teacher weights :math:`W_1` (``hidden x d``)
    and :math:`W_2` (``num_classes x hidden``) are standard Gaussian scaled by ``1/sqrt(fan_in)``, and
    :math:`c` is the mean teacher output over the training inputs (subtracting it keeps the classes roughly
    balanced). With ``teacher_sparsity > 0`` that fraction of the teacher's weights (chosen at random per
    layer) is zero, so a student can recover a known sparse structure. Everything is fixed by ``seed``
    (a ``torch.Generator``; the global RNG is not used). The teacher (an ``nn.Sequential``) is kept in
    ``task.meta["teacher"]``. Input shape ``(in_features,)``, ``num_classes`` classes.

    The setting of the survey's discussion of over-parameterization and generalization (§2.3, "Occam's
    hill"): the labels are an exact function of the inputs, so the only error is the student's.
    """
    n_train = _check_int(n_train, "n_train")
    n_test = _check_int(n_test, "n_test")
    in_features = _check_int(in_features, "in_features")
    hidden = _check_int(hidden, "hidden")
    num_classes = _check_int(num_classes, "num_classes", minimum=2)
    seed = _check_int(seed, "seed", minimum=0)
    if isinstance(teacher_sparsity, bool) or not isinstance(teacher_sparsity, (int, float)) \
            or math.isnan(teacher_sparsity) or not 0.0 <= teacher_sparsity < 1.0:
        raise ValueError(f"teacher_sparsity must be in [0, 1), got {teacher_sparsity!r}")

    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, in_features, generator=g) / math.sqrt(in_features)
    w2 = torch.randn(num_classes, hidden, generator=g) / math.sqrt(hidden)
    for w in (w1, w2):
        if teacher_sparsity > 0:
            n_zero = int(round(teacher_sparsity * w.numel()))
            w.view(-1)[torch.randperm(w.numel(), generator=g)[:n_zero]] = 0.0
    x = torch.randn(n_train + n_test, in_features, generator=g)
    with torch.no_grad():
        logits = torch.tanh(x @ w1.T) @ w2.T
        offset = logits[:n_train].mean(dim=0)
        y = (logits - offset).argmax(dim=1)

    with torch.random.fork_rng(devices=[]):  # nn.Linear draws an initialization we overwrite at once
        teacher = nn.Sequential(nn.Linear(in_features, hidden, bias=False), nn.Tanh(),
                                nn.Linear(hidden, num_classes, bias=True))
    with torch.no_grad():
        teacher[0].weight.copy_(w1)
        teacher[2].weight.copy_(w2)
        teacher[2].bias.copy_(-offset)
    teacher.requires_grad_(False)
    return Task(name="teacher_student", x_train=x[:n_train].contiguous(), y_train=y[:n_train].contiguous(),
                x_test=x[n_train:].contiguous(), y_test=y[n_train:].contiguous(), num_classes=num_classes,
                description=f"Gaussian inputs (d={in_features}) labelled by a random tanh teacher "
                            f"({hidden} hidden, sparsity {teacher_sparsity}), seed={seed}",
                meta={"teacher": teacher, "teacher_sparsity": float(teacher_sparsity)})


__all__ = ["Task", "digits", "mnist1d", "teacher_student"]


# ------------------------------------------------------------------------------- Chapter 12: sequence task
def associative_recall(n_train: int = 4000, n_test: int = 1000, num_pairs: int = 16, num_keys: int = 16,
                       num_values: int = 8, seed: int = 0) -> Task:
    """Associative recall, a token-sequence task that needs attention (Chapter 12; the in-context recall task of
    Ba et al. and of the "induction head" literature, here in a one-step form).

    Each sequence holds ``num_pairs`` *pair tokens* ``key * num_values + value`` with distinct keys drawn from
    ``num_keys`` and values uniform in ``num_values``, in random order, followed by one *query token*
    ``num_keys * num_values + key`` naming one of the keys present. The target is that key's value. The answer
    can sit at any distance from the query, so a model must attend from the last position to the matching pair
    (a window of ``w`` recent tokens finds it in about ``w / num_pairs`` of the sequences). Chance level is
    ``1 / num_values``.

    Inputs ``(N, num_pairs + 1)`` int64 tokens (vocabulary ``num_keys * (num_values + 1)`` in
    ``task.meta["vocab_size"]``), ``num_values`` classes; ``meta["answer_position"]`` gives, per test sequence,
    where the matching pair sits. Generated from ``seed`` (a ``torch.Generator``), offline.
    """
    n_train = _check_int(n_train, "n_train")
    n_test = _check_int(n_test, "n_test")
    num_pairs = _check_int(num_pairs, "num_pairs")
    num_keys = _check_int(num_keys, "num_keys")
    num_values = _check_int(num_values, "num_values", minimum=2)
    seed = _check_int(seed, "seed", minimum=0)
    if num_pairs > num_keys:
        raise ValueError(f"num_pairs must be <= num_keys (keys are distinct), got {num_pairs} > {num_keys}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    keys = torch.rand(n, num_keys, generator=g).argsort(dim=1)[:, :num_pairs]          # distinct keys
    values = torch.randint(0, num_values, (n, num_pairs), generator=g)
    which = torch.randint(0, num_pairs, (n,), generator=g)
    rows = torch.arange(n)
    query = num_keys * num_values + keys[rows, which]
    tokens = torch.cat([keys * num_values + values, query[:, None]], dim=1)
    y = values[rows, which]
    return Task(name="associative_recall", x_train=tokens[:n_train].contiguous(), y_train=y[:n_train].contiguous(),
                x_test=tokens[n_train:].contiguous(), y_test=y[n_train:].contiguous(), num_classes=num_values,
                description=f"associative recall: {num_pairs} key-value tokens then a query key; predict its value "
                            f"({num_keys} keys, {num_values} values), seed={seed}",
                meta={"vocab_size": num_keys * (num_values + 1), "seq_len": num_pairs + 1,
                      "answer_position": which[n_train:].clone()})


__all__ += ["associative_recall"]
