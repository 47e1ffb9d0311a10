"""`ddrl pretrain`: flow-matching training of the tiny DiT on the demo shards -> base checkpoint.

This is how the shipped `ddrl_scale/assets/base_dit.safetensors` was made: real post-training
starts from a pretrained model, so the demo does too. The saved weights are the EMA of training.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm import tqdm

from ddrl_scale.algo.losses import flow_matching_loss
from ddrl_scale.algo.schedules import add_noise, sample_training_sigma
from ddrl_scale.config.schema import RunConfig
from ddrl_scale.data.anchor import AnchorLoader
from ddrl_scale.models import PixelVAE, VideoDiT, build_text_encoder, dit_config_from, save_weights
from ddrl_scale.runtime import resolve_device, seed_everything
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.ema import EMA

logger = logging.getLogger(__name__)


def pretrain(config: RunConfig) -> str:
    seed_everything(config.run.seed)
    device = resolve_device(config.run.device)
    settings = config.pretrain
    model = VideoDiT(dit_config_from(config)).to(device)
    ema = EMA(model, 0.999)
    text_encoder, vae = build_text_encoder(config), PixelVAE()
    loader = AnchorLoader(demo_shards(config), settings.batch_size, config.run.seed,
                          config.data.shuffle_buffer, encode=vae.encode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.99),
                                  weight_decay=1e-4)
    warmup = min(200, settings.steps // 10 + 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
    start, losses = time.time(), []
    progress = tqdm(range(settings.steps), desc="pretrain", disable=not config.train.progress)
    for step in progress:
        batch = loader.next_batch()
        x0 = batch.latents.to(device)
        noise = torch.randn_like(x0)
        sigma = sample_training_sigma(x0.shape[0], device=device)
        v_pred = model(add_noise(x0, noise, sigma), sigma, text_encoder.encode(batch.captions, device))
        loss = flow_matching_loss(v_pred, x0, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(model)
        losses.append(loss.item())
        if step % 50 == 0:
            progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    ema.copy_to(model)
    final_loss = sum(losses[-100:]) / max(1, len(losses[-100:]))
    path = save_weights(model, settings.output, extra={
        "made_by": f"ddrl pretrain pretrain.steps={settings.steps} pretrain.batch_size="
                   f"{settings.batch_size} pretrain.lr={settings.lr} run.seed={config.run.seed}",
        "final_train_loss": round(final_loss, 5), "seconds": round(time.time() - start, 1)})
    logger.info("pretrained %d steps in %.0f s, last-100 loss %.4f -> %s", settings.steps,
                time.time() - start, final_loss, path)
    return str(path)
