# Two commands on a fresh machine:  make demo   and   make test
# GPU users: make demo TORCH=torch   (PyPI's default Linux build of torch is the CUDA one)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEMO_DATA ?= data/demo_empty8x8.npz
DEMO_EPISODES ?= 80
DEMO_EPOCHS ?= 3

.PHONY: setup setup-extras demo plan plan-unseen ablation test test-all lint clean

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)" -r requirements-dev.txt
	touch $@

setup: $(BIN)/.installed

# optional: Atari (ale-py) and CarRacing (box2d, built with swig) for collect_minigrid_data.py --env ALE/... or CarRacing-v3
setup-extras: setup
	$(BIN)/pip install -q -r requirements-extras.txt

# collect -> summarise -> train the CNN JEPA -> inspect: a few minutes on a 2-core CPU
demo: setup
	$(BIN)/python collect_minigrid_data.py --env MiniGrid-Empty-8x8-v0 --episodes $(DEMO_EPISODES) --actions nav --seed 0 --out $(DEMO_DATA) --overwrite
	$(BIN)/python minigrid_dataset.py $(DEMO_DATA)
	$(BIN)/python train_jepa.py --arch cnn --data $(DEMO_DATA) --epochs $(DEMO_EPOCHS) --seed 0 --out-dir checkpoints/jepa_cnn --overwrite
	$(BIN)/python inspect_jepa_model.py --checkpoint checkpoints/jepa_cnn --data $(DEMO_DATA) --out-dir inspection
	@echo "Done: checkpoints/jepa_cnn/loss.png, inspection/inspection.png, inspection/eval.json"

# after make demo: reach goals in Empty-8x8 by planning with the demo's model (about a minute)
plan: setup
	$(BIN)/python plan_with_world_model.py --checkpoint checkpoints/jepa_cnn --episodes 20 --out-dir planning

# plan on layouts the model never saw: collect TRAIN_LAYOUTS layouts of ENV (random starts, 8 px per
# cell), train the spatial CNN JEPA, plan with the imagined search on layouts from EVAL_SEED on.
# The training seeds are chosen disjoint from the evaluation's; plan.json says what was held out.
ENV ?= MiniGrid-SimpleCrossingS9N1-v0
EVAL_SEED ?= 10000
OUT ?= plan_unseen
TRAIN_LAYOUTS ?= 250
PLAN_EPISODES ?= 20
PLAN_TRAIN_FLAGS ?=
plan-unseen: setup
	@size=$$($(BIN)/python -c "import gymnasium as gym, minigrid; print(8 * gym.make('$(ENV)').unwrapped.width)") && \
	train_seed=$$(( $(EVAL_SEED) >= $(TRAIN_LAYOUTS) ? 0 : $(EVAL_SEED) + $(PLAN_EPISODES) )) && \
	$(BIN)/python collect_minigrid_data.py --env $(ENV) --episodes $(TRAIN_LAYOUTS) --max-steps 60 --seed $$train_seed \
		--start random --actions nav --image-size $$size --out $(OUT)/data.npz --overwrite && \
	$(BIN)/python train_jepa.py --arch cnn --spatial --data $(OUT)/data.npz --seed 0 --out-dir $(OUT)/model --overwrite $(PLAN_TRAIN_FLAGS) && \
	$(BIN)/python plan_with_world_model.py --checkpoint $(OUT)/model --planner imagined --env $(ENV) --seed $(EVAL_SEED) \
		--episodes $(PLAN_EPISODES) --out-dir $(OUT)

# after make demo: each term of the objective removed in turn, same data and budget; rewrites the README's table (~25 min on 2 cores)
ablation: setup
	$(BIN)/python ablation.py --data $(DEMO_DATA) --steps 648 --seeds 0 --out-dir ablation --readme README.md

test: setup
	$(BIN)/python -m pytest -q -n auto

test-all: setup
	$(BIN)/python -m pytest -q -n auto -m ""

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf data checkpoints inspection planning ablation .pytest_cache
