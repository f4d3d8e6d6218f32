# Sparsity in Deep Learning: the executable book.
#
#   make book    set up .venv, execute every chapter fresh, build the HTML book, print the path of index.html
#   make test    set up .venv, run the library tests and every chapter notebook (pytest + nbval)
#   make lab     set up .venv, open JupyterLab on chapters/
#   make check-book   open every page of the built book in headless Chromium, offline (tools/check_book.py)
#   make bench   set up .venv, print the timing tables of sparsity_lib.bench (masked training steps, chapters, OBC/SparseGPT)
#   make full    execute the chapters at FULL scale into _build/full/, print runtime and pass/fail (CHAPTERS="10 12")
#   make student write the student edition of the notebooks into _build/student (solutions replaced by stubs)
#   make clean   remove the built book and caches (keeps .venv)
#   make distclean   clean, and remove .venv too
#
# Everything runs from a virtual environment in .venv that this Makefile creates and keeps up to date:
# it is re-installed whenever requirements.txt or pyproject.toml change.
#
#   make setup TORCH_INDEX=cpu   opt-in: take torch from PyTorch's CPU wheel index (see TORCH_INDEX below)

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
BIN    := $(VENV)/bin

# Reproducible runs: a fixed hash seed (set iteration order, dict-of-sets, ...). Thread counts are left alone on
# purpose: OMP_NUM_THREADS / MKL_NUM_THREADS pass through from the caller untouched, and sparsity_lib.config sets
# torch's own thread count, so the same notebook behaves the same under make, JupyterLab and Colab.
export PYTHONHASHSEED := 0
# torch's OpenMP threads spin while they wait for work; when two notebooks share two cores (make test runs two at a
# time) spinning threads starve each other and small models train 40x slower. Passive waiting costs nothing here.
export OMP_WAIT_POLICY ?= PASSIVE

# `make book` rebuilds every page (--all): Sphinx would otherwise skip pages it believes unchanged, and their
# notebooks would not be executed again. Add -W here to turn warnings into errors.
BOOK_FLAGS ?= --all
# Extra options for JupyterLab, e.g. make lab LAB_FLAGS="--no-browser --port 8899"
LAB_FLAGS ?=
# Jupyter refuses to start as root (common in containers) unless told so explicitly.
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: help setup test book check-book lab bench full clean distclean

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

# --- set-up ------------------------------------------------------------------------------------------------------
# Opt-in, off by default: where pip takes torch from. requirements.txt pins torch==2.13.0 exactly; on an ordinary
# Linux x86-64 machine PyPI resolves that pin to the CUDA build, with gigabytes of nvidia-* packages. With
# TORCH_INDEX=cpu the pinned torch alone (--no-deps) is installed first from PyTorch's CPU wheel index (the build
# the book needs, a few hundred MB); requirements.txt (torch's own dependencies included, it is a full lock) then
# comes from the usual index and finds torch already satisfied (2.13.0+cpu satisfies ==2.13.0). TORCH_INDEX may also be a full index URL (another wheel variant, a mirror).
# Unset (the default) nothing changes: pip's own configuration (PIP_INDEX_URL, pip.conf, an offline wheelhouse)
# decides, as before. Use it on a fresh .venv: `make distclean` first if torch is already installed.
TORCH_INDEX ?=
TORCH_INDEX_URL := $(if $(filter cpu,$(TORCH_INDEX)),https://download.pytorch.org/whl/cpu,$(TORCH_INDEX))
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

# The stamp lives inside .venv, so deleting .venv also forces a fresh install.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || { echo "== creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install --no-deps --index-url $(TORCH_INDEX_URL) '$(TORCH_PIN)')
	$(BIN)/pip install -r requirements.txt
	@# The editable install below runs without build isolation, so the build backend must already be in the venv.
	@# Python 3.11's venv ships setuptools but not `wheel`, which setuptools < 70.1 needs to build any wheel.
	$(BIN)/python -c 'import setuptools, wheel' 2>/dev/null || $(BIN)/pip install 'setuptools>=64' wheel
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

# --- the four commands --------------------------------------------------------------------------------------------
# MPLBACKEND=Agg: tests never need a display and never open windows.
test: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest -n 2 --dist loadfile

# No MPLBACKEND for the book: inside a Jupyter kernel an empty MPLBACKEND lets ipykernel select the inline
# backend, which is what puts figures into the executed pages. Exporting MPLBACKEND=Agg here would silently drop
# every plt.show() figure from the rendered book. The builder process itself has no display and uses Agg anyway.
book: $(STAMP)
	env -u MPLBACKEND $(BIN)/jupyter-book build $(BOOK_FLAGS) .
	@echo
	@echo "The book: $(abspath _build/html/index.html)"

# After `make book`: every page opened from disk in headless Chromium with the network blocked (no console error,
# no request off this machine, every equation typeset, every chapter's kernel-free explorer moves); screenshots go
# to _build/html/_screenshots/. Needs a Chromium (Debian: apt-get install chromium; .ci/run installs it).
check-book: $(STAMP)
	$(BIN)/python tools/check_book.py _build/html $(if $(CHROMIUM),--chromium $(CHROMIUM))

lab: $(STAMP)
	$(BIN)/jupyter-lab --ServerApp.root_dir=chapters $(LAB_ROOT) $(LAB_FLAGS)

bench: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m sparsity_lib.bench

# FULL scale (bigger models, more epochs, more seeds; see sparsity_lib/config.py): every chapter, or those named in
# CHAPTERS, executed one at a time in a fresh kernel, claim cells included; the executed notebooks (figures too: no
# MPLBACKEND, as for the book) go to _build/full/. Exits non-zero if a chapter failed or ran past FULL_TIMEOUT.
CHAPTERS ?=
FULL_TIMEOUT ?= 14400
full: $(STAMP)
	env -u MPLBACKEND SPARSITY_SCALE=full $(BIN)/python -m sparsity_lib.bench.chapters --out _build/full --timeout $(FULL_TIMEOUT) $(CHAPTERS)

# The student edition: every '# BEGIN SOLUTION' ... '# END SOLUTION' region of a cell tagged `solution` becomes
# raise NotImplementedError("your turn: ..."), the checks stay, the exercises' solutions go (sparsity_lib/student.py).
.PHONY: student
student: $(STAMP)
	$(BIN)/python -m sparsity_lib.student --out _build/student

benchmark: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m sparsity_lib.benchmark --out benchmark_$${SPARSITY_SCALE:-fast}.csv

# --- cleaning ----------------------------------------------------------------------------------------------------
clean:
	rm -rf _build .jupyter_cache .pytest_cache
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) *.egg-info
