# GameNGen-Mini. `make demo` and `make test` do all the set-up on a fresh machine.
PY := .venv/bin/python
VENV_OK := .venv/.installed

.PHONY: demo test lint format bench bench-browser bench-gpu gpu-check gpu-run gpu-pack data train-cpu train-gpu clean

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

# play.py --serve in headless Chromium: frames/s and key-to-frame latency, PNG against raw frames (docs/browser.md).
bench-browser: $(VENV_OK)
	$(PY) play_web.py

# Recording needs gymnasium + ale-py (and SB3 for the DQN); it resumes, so re-running is cheap.
data: $(VENV_OK)
	$(RECORD) --agent tracker --epsilon 0.25 --episodes 24 --seed 0 --out data/pong_tracker_e25
	$(RECORD) --agent tracker --epsilon 0.10 --episodes 24 --seed 5000 --out data/pong_tracker_e10
	$(RECORD) --agent dqn --epsilon 0.25 --episodes 12 --seed 1000 --out data/pong_dqn
	$(RECORD) --agent random --episodes 16 --seed 20000 --out $(RANDOM)
	$(RECORD) --agent tracker --epsilon 0.15 --episodes 6 --seed 90000 --out $(HELDOUT) --max-episode-frames 1500 --workers 1

# The shipped model, trained on this repository's 2-core CPU machine, one core per run (about 12.5 hours):
# the VAE (38 min), the DiT (100 min, 8 episodes of each set), its fine-tune with the random agent's
# episodes added (70 min), a lighter decoder (50 min) for the frozen encoder, then 35 more minutes of
# the DiT on the bundled VAE's latents (seed 1: the better of two such runs on the held-out set), then
# 60 minutes with a clean context and the sampler's noise levels (issue #21), then 45 minutes of the decoder
# with the score's digits in its loss, then the whole VAE 35 minutes with noise on its latents and the DiT
# 30 + 105 minutes on the new latents, then 105 + 60 more on every recorded episode (issue #26; docs/experiments.md).
# The last eight ran in bf16.
VAE_DATA := data/pong_tracker_e25,data/pong_tracker_e10
RESUME = $$(test -f $(1)/ckpt.pt && echo --resume)
# Each run in bf16 on a CPU with AVX-512 BF16 or AMX (1.23-1.40x the steps a minute here; issue #25, docs/speed.md);
# the shipped model's stages ran in fp32: `make train-cpu PRECISION=fp32` replays them so.
PRECISION := auto
CPU_RUN := OMP_NUM_THREADS=1 $(PY) train.py
train-cpu: $(VENV_OK)
	$(CPU_RUN) vae --precision $(PRECISION) --preset cpu --data $(VAE_DATA) --out runs/vae_cpu $(call RESUME,runs/vae_cpu)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA) --vae runs/vae_cpu --out runs/dit_cpu \
		--max-episodes 8 --max-minutes 100 $(call RESUME,runs/dit_cpu)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_cpu --init runs/dit_cpu --out runs/dit_ft \
		--max-episodes 8 --steps 2000 --lr 2e-4 --warmup 50 --max-minutes 70 $(call RESUME,runs/dit_ft)
	$(CPU_RUN) vae --precision $(PRECISION) --preset cpu --data $(VAE_DATA) --init runs/vae_cpu --decoder-only --decoder lite \
		--fg-weight 100 --steps 6000 --max-minutes 50 --out runs/vae_lite $(call RESUME,runs/vae_lite)
	$(PY) bundle.py --dit runs/dit_ft --vae runs/vae_lite/ckpt.pt --out checkpoints
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae checkpoints/pong_vae.pt --init checkpoints/pong_dit.pt \
		--out runs/dit_ft2 --max-episodes 8 --lr 2e-4 --warmup 50 --max-minutes 35 --seed 1 --sample-every 0 \
		$(call RESUME,runs/dit_ft2)
	$(PY) bundle.py --dit runs/dit_ft2 --vae checkpoints/pong_vae.pt --out checkpoints
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae checkpoints/pong_vae.pt --init checkpoints/pong_dit.pt \
		--out runs/dit_clean --max-episodes 8 --lr 2e-4 --warmup 50 --max-minutes 60 --seed 2 --sample-every 0 \
		--clean-context 1 --sampler-levels 0.5 $(call RESUME,runs/dit_clean)
	$(PY) bundle.py --dit runs/dit_clean --vae checkpoints/pong_vae.pt --out checkpoints
	$(CPU_RUN) vae --precision $(PRECISION) --preset cpu --data $(VAE_DATA) --init checkpoints/pong_vae.pt --decoder-only \
		--fg-weight 100 --fg-mask colour --max-minutes 25 --out runs/vae_digits $(call RESUME,runs/vae_digits)
	$(CPU_RUN) vae --precision $(PRECISION) --preset cpu --data $(VAE_DATA) --init runs/vae_digits --decoder-only \
		--fg-weight 100 --fg-mask colour --lr 1e-4 --warmup 50 --max-minutes 20 --out runs/vae_digits2 \
		$(call RESUME,runs/vae_digits2)
	$(PY) bundle.py --dit checkpoints/pong_dit.pt --vae runs/vae_digits2/ckpt.pt --out checkpoints
	$(CPU_RUN) vae --precision $(PRECISION) --preset cpu --data $(VAE_DATA) --init checkpoints/pong_vae.pt --fg-weight 100 \
		--fg-mask colour --latent-noise 0.2 --lr 1e-4 --warmup 50 --max-minutes 35 --out runs/vae_noise \
		$(call RESUME,runs/vae_noise)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_noise --init checkpoints/pong_dit.pt \
		--init-new-vae --out runs/dit_noise --max-episodes 8 --lr 2e-4 --warmup 50 --max-minutes 30 --seed 3 \
		--sample-every 0 --clean-context 1 --sampler-levels 0.5 $(call RESUME,runs/dit_noise)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_noise --init runs/dit_noise \
		--out runs/dit_noise2 --max-episodes 8 --lr 2e-4 --warmup 50 --max-minutes 105 --seed 4 \
		--sample-every 0 --clean-context 1 --sampler-levels 0.5 $(call RESUME,runs/dit_noise2)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_noise --init runs/dit_noise2 \
		--out runs/dit_noise3 --lr 2e-4 --warmup 50 --max-minutes 105 --seed 5 \
		--sample-every 0 --clean-context 1 --sampler-levels 0.5 $(call RESUME,runs/dit_noise3)
	$(CPU_RUN) dit --precision $(PRECISION) --preset cpu --data $(DATA),$(RANDOM) --vae runs/vae_noise --init runs/dit_noise3 \
		--out runs/dit_noise4 --lr 2e-4 --warmup 50 --max-minutes 60 --seed 6 \
		--sample-every 0 --clean-context 1 --sampler-levels 0.5 $(call RESUME,runs/dit_noise4)
	$(PY) bundle.py --dit runs/dit_noise4 --vae runs/vae_noise/ckpt.pt --out checkpoints

# The same recipe with the gpu presets, on one GPU, from recorded data (make data first, on any machine):
# about 7 minutes of training. Each stage resumes from its checkpoint if present. PY=python3 without .venv.
train-gpu:
	$(PY) train.py vae --preset gpu --data $(DATA) --out runs/vae $(call RESUME,runs/vae)
	$(PY) train.py dit --preset gpu --data $(DATA),$(RANDOM) --vae runs/vae --out runs/dit $(call RESUME,runs/dit)
	$(PY) train.py vae --preset gpu --data $(DATA) --init runs/vae --decoder-only --decoder lite \
		--max-minutes 1 --out runs/vae_lite $(call RESUME,runs/vae_lite)
	$(PY) bundle.py --dit runs/dit --vae runs/vae_lite/ckpt.pt --out checkpoints

# One lent GPU call (docs/gpu.md): carry .gpu/ (make gpu-pack), then `make gpu-run` on the bare machine records
# fresh episodes, trains the DiT arms side by side on the shipped VAE's latents, bundles and evaluates them beside
# the shipped model, all in <= 9.5 minutes; results (the arms' fp16 DiTs, report.md, results.json, log.txt) in $$OUT.
# The CPU check of the same command: make gpu-run PRESET=tiny DEVICE=cpu (tests/test_gpu_run.py runs it).
GPU_PY := $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PRESET := gpu
DEVICE := auto
gpu-run:
	$(GPU_PY) gpu_run.py --preset $(PRESET) --device $(DEVICE)

# Here, with PyPI: .gpu/wheels (gymnasium, ale-py and what they need, Python 3.12 manylinux x86-64) and .gpu/data
# (the held-out set and the training sets, without latents); prints its size with the working tree (<= 64 MiB).
gpu-pack: $(VENV_OK)
	$(PY) gpu_run.py --make-pack --heldout $(HELDOUT) --data $(DATA),$(RANDOM)

# The GPU figures as a second command (<= 4 minutes, not yet measured): training samples/s and MFU of DiT-XS and
# XS1 at batch 64 and at the batch rule's, eager and compiled; generation frames/s at batch 1 to 1024.
bench-gpu:
	$(GPU_PY) bench.py --what train --device cuda --precision bf16 --window 6 --train-models XS,XS1 \
		--train-batch 64,auto --compile
	$(GPU_PY) bench.py --what generate --device cuda --steps 2 --gen-batches 1,64,256,1024

# The previous name of the one GPU command.
gpu-check: gpu-run

clean:
	rm -rf .venv runs data
