"""`ddrl pretrain`: flow-matching training of the DiT on the anchor shards -> a base checkpoint.

This is how the shipped `ddrl_scale/assets/base_dit.safetensors` was made: real post-training
starts from a pretrained model, so the demo does too. It runs on the same engines as DDRL
(`parallel.engine`, under torchrun for several ranks); each data-parallel rank takes its share of
the global batch, noise is keyed by (seed, step, sample index), and the saved weights are the EMA.
Checkpoints go to <output's folder>/checkpoints and a restarted run resumes from the latest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from ddrl_scale.algo.losses import flow_matching_loss
from ddrl_scale.algo.noise import data_term_draws
from ddrl_scale.algo.schedules import add_noise
from ddrl_scale.config.schema import OptimSection, RunConfig
from ddrl_scale.data.anchor import AnchorLoader
from ddrl_scale.models import PixelVAE, VideoDiT, build_text_encoder, dit_config_from, save_weights
from ddrl_scale.parallel import build_engine, init_world
from ddrl_scale.parallel.distributed import barrier, reduce_metrics
from ddrl_scale.runtime import seed_everything
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ddrl_scale.train.trainer import local_slice

logger = logging.getLogger(__name__)


def pretrain_optim(config: RunConfig) -> OptimSection:
    settings = config.pretrain
    return dataclasses.replace(config.optim, lr=settings.lr, betas=[0.9, 0.99], weight_decay=1e-4,
                               warmup_steps=min(200, settings.steps // 10 + 1),
                               decay_steps=settings.steps, grad_clip=1.0,
                               ema_decay=settings.ema_decay)


def pretrain(config: RunConfig) -> str:
    """Every rank calls; returns the path of the saved EMA weights."""
    seed_everything(config.run.seed)
    settings, world = config.pretrain, init_world(config.run.device, config.parallel.timeout_s)
    model_parallel = config.parallel.cp * config.parallel.tp
    share = local_slice(settings.batch_size, world, model_parallel, "pretrain.batch_size")
    model = VideoDiT(dit_config_from(config))
    engine = build_engine(model, pretrain_optim(config), config.parallel, world, config.run.dtype)
    text_encoder, vae = build_text_encoder(config), PixelVAE()
    if world.is_main:
        demo_shards(config)
    barrier(world, "anchor shards ready")
    loader = AnchorLoader(demo_shards(config), settings.batch_size, config.run.seed,
                          config.data.shuffle_buffer, encode=vae.encode)
    run_dir, step = Path(settings.output).parent, 0
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, engine, world)
        loader.load_state_dict(state["loader"])
        step = int(state["step"])
        logger.info("resumed pretraining from %s at step %d", resume_from, step)
    start, recent = time.time(), []
    progress = tqdm(total=settings.steps, initial=step, desc="pretrain",
                    disable=not (config.train.progress and world.is_main))
    while step < settings.steps:
        batch = loader.next_batch()
        x0 = batch.latents[share].to(world.device)
        items = list(range(share.start, share.stop))
        noise, sigma = data_term_draws(x0.shape[1:], items, config.run.seed, step,
                                       device=world.device)
        text = text_encoder.encode(batch.captions[share], world.device)
        loss = flow_matching_loss(engine.forward(add_noise(x0, noise, sigma), sigma, text), x0,
                                  noise).mean()
        engine.backward(loss)
        engine.step()
        step += 1
        recent = (recent + [reduce_metrics({"loss": loss.item()}, world)["loss"]])[-100:]
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{sum(recent[-50:]) / len(recent[-50:]):.4f}")
        if settings.save_every and step % settings.save_every == 0:
            save_checkpoint(run_dir, step, engine, {"loader": loader.state_dict(),
                            "dit_config": json.dumps(model.config.to_dict())}, world)
    progress.close()
    # stream the EMA one tensor at a time; rank 0 assembles the file
    weights = {name: tensor.cpu() for name, tensor in engine.full_weights(ema=True)}
    final_loss = sum(recent) / max(1, len(recent))
    if world.is_main:
        exported = VideoDiT(model.config)
        exported.load_state_dict(weights)
        save_weights(exported, settings.output, extra={
            "made_by": f"ddrl pretrain pretrain.steps={settings.steps} pretrain.batch_size="
                       f"{settings.batch_size} pretrain.lr={settings.lr} run.seed={config.run.seed}",
            "final_train_loss": round(final_loss, 5), "seconds": round(time.time() - start, 1)})
        logger.info("pretrained to step %d in %.0f s, last-100 loss %.4f -> %s", step,
                    time.time() - start, final_loss, settings.output)
    barrier(world, "pretrain saved")
    return str(settings.output)
