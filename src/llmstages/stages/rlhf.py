"""RLHF with PPO: the SFT policy (plus a value head) optimised against the frozen reward model, with a
per-token KL penalty to the frozen SFT reference.

Recipe: Ziegler et al. (2019), Ouyang et al. (2022) and Huang et al. (2024), "The N+ implementation
details of RLHF with PPO": the reward-model score is placed on the last generated token, every token is
charged ``-kl_coef * KL_t``, advantages come from GAE (whitened over valid tokens), and each rollout batch is
used for ``ppo_epochs`` passes of clipped policy and value updates in minibatches. Lightning's manual
optimization runs those updates inside ``training_step``; ``trainer.max_steps`` counts optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..checkpoint import load_output, save_output
from ..data.datasets import PromptDataset, collate_prompts, read_jsonl, PROMPT_FIELDS
from ..evaluation import answer_metrics, eval_subset, full_attention, generate_answers, reward_scores
from ..generation import generate
from ..losses import gae, kl_estimate, masked_mean, ppo_policy_loss, token_entropy, token_logprobs, value_loss, whiten
from ..model import GPT, ScalarHead, param_groups
from ..tokenizer import EOS_ID, PAD_ID, encode_prompt, load_tokenizer
from .common import Stage, adamw_with_schedule, optim_kwargs, seed_everything


class PPOModule(L.LightningModule):
    """PPO for a causal LM. Shapes: ``B`` rollouts, ``P`` padded prompt length, ``N`` response length."""

    def __init__(self, policy: GPT, reference: GPT, reward_model: GPT, reward_head: ScalarHead, optim: dict,
                 ppo: dict, grad_clip: float) -> None:
        super().__init__()
        self.policy, self.value_head = policy, ScalarHead(policy.cfg.d_model)
        self.reference, self.reward_model, self.reward_head = reference, reward_model, reward_head
        for frozen in (reference, reward_model, reward_head):
            frozen.requires_grad_(False).eval()
        self.optim, self.ppo, self.grad_clip = optim, ppo, grad_clip
        self.automatic_optimization = False

    def forward_response(self, model: GPT, tokens, attn, pos, P: int, value_head: ScalarHead | None = None):
        """Logits ``(B, N, V)`` predicting the response tokens, and values ``(B, N)`` when a head is given."""
        h = model.hidden(tokens, positions=pos, attn_mask=attn)[:, P - 1:-1]
        return model.lm_head(h), (value_head(h) if value_head is not None else None)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> dict:
        """Sample responses and compute everything PPO needs, without gradients."""
        c = self.ppo
        g = generate(self.policy, prompts, c["max_new_tokens"], EOS_ID, PAD_ID, temperature=c["temperature"],
                     top_k=c["top_k"], top_p=c["top_p"])
        tokens, amask, rmask = g.tokens.clone(), g.attention_mask.clone(), g.response_mask.clone().float()
        finished, P = g.finished.clone(), g.prompt_len
        attn, pos = full_attention(amask)
        resp = tokens[:, P:]
        logits, values = self.forward_response(self.policy, tokens, attn, pos, P, self.value_head)
        logp = token_logprobs(logits, resp)
        ref_logits, _ = self.forward_response(self.reference, tokens, attn, pos, P)
        ref_logp = token_logprobs(ref_logits, resp)
        score = reward_scores(self.reward_model, self.reward_head, tokens, amask)
        score = score - c["missing_eos_penalty"] * (~finished).float()
        kl = kl_estimate(logp, ref_logp, c["kl_estimator"]) * rmask
        rewards = -c["kl_coef"] * kl
        last = (rmask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += score
        adv, returns = gae(rewards, values.float() * rmask, rmask, c["gamma"], c["lam"])
        if c["whiten_advantages"]:
            adv = whiten(adv, rmask)
        return dict(tokens=tokens, attn=attn, pos=pos, P=P, resp=resp, mask=rmask, logp=logp, values=values.float(),
                    adv=adv, returns=returns, score=score, kl=kl.sum(1), entropy=masked_mean(token_entropy(logits), rmask),
                    length=rmask.sum(1), finished=finished.float())

    def training_step(self, batch, batch_idx):
        c = self.ppo
        opt, sched = self.optimizers(), self.lr_schedulers()
        r = self.rollout([b["prompt_ids"] for b in batch])
        B, stats = r["tokens"].shape[0], []
        for _ in range(c["ppo_epochs"]):
            for idx in torch.randperm(B).split(c["minibatch_size"]):
                logits, values = self.forward_response(self.policy, r["tokens"][idx], r["attn"][idx], r["pos"][idx],
                                                       r["P"], self.value_head)
                logp = token_logprobs(logits, r["resp"][idx])
                mask = r["mask"][idx]
                pg_loss, clipfrac = ppo_policy_loss(logp, r["logp"][idx], r["adv"][idx], mask, c["clip_range"])
                vf_loss = value_loss(values, r["values"][idx], r["returns"][idx], mask, c["value_clip_range"])
                loss = pg_loss + c["vf_coef"] * vf_loss
                opt.zero_grad()
                self.manual_backward(loss)
                if self.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                sched.step()
                stats.append(torch.stack([pg_loss.detach(), vf_loss.detach(), clipfrac.detach()]))
        pg, vf, cf = torch.stack(stats).mean(0)
        self.log_dict({"train/reward": r["score"].mean(), "train/kl": r["kl"].mean(), "train/policy_loss": pg,
                       "train/value_loss": vf, "train/clipfrac": cf, "train/entropy": r["entropy"],
                       "train/response_tokens": r["length"].mean(), "train/eos_fraction": r["finished"].mean()},
                      prog_bar=False, batch_size=B)
        self.log("reward", r["score"].mean(), prog_bar=True, logger=False, batch_size=B)

    def configure_optimizers(self):
        groups = param_groups(self.policy, self.optim["weight_decay"]) + [{"params": self.value_head.parameters(),
                                                                           "weight_decay": 0.0}]
        return adamw_with_schedule(groups, **self.optim)


@torch.no_grad()
def sequence_kl(policy: GPT, reference: GPT, tok, prompts: list[str], max_new_tokens: int, estimator: str) -> float:
    """Mean over prompts of the summed per-token KL estimate (nats) on responses sampled from ``policy``."""
    g = generate(policy, [encode_prompt(tok, p) for p in prompts], max_new_tokens, EOS_ID, PAD_ID, temperature=1.0)
    attn, pos = full_attention(g.attention_mask)
    P, resp, mask = g.prompt_len, g.responses, g.response_mask.float()
    logp = token_logprobs(policy.lm_head(policy.hidden(g.tokens, positions=pos, attn_mask=attn)[:, P - 1:-1]), resp)
    ref = token_logprobs(reference.lm_head(reference.hidden(g.tokens, positions=pos, attn_mask=attn)[:, P - 1:-1]), resp)
    return float((kl_estimate(logp, ref, estimator) * mask).sum(1).mean())


def heldout_eval(model: GPT, reward_model: GPT, reward_head: ScalarHead, tok, rows: list[dict],
                 max_new_tokens: int) -> tuple[dict, torch.Tensor, list[str]]:
    """Greedy responses on held-out prompts: answer metrics, per-prompt reward-model scores ``(n,)``, texts."""
    texts, gens = generate_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    scores = torch.cat([reward_scores(reward_model, reward_head, g.tokens, g.attention_mask) for g in gens])
    return {**answer_metrics(rows, texts, gens), "reward": float(scores.mean())}, scores, texts


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """PPO from ``policy_from`` against ``reward_from``; return held-out metrics of SFT and RLHF side by side."""
    seed_everything(cfg.trainer.seed)
    data_dir, sft_dir, rm_dir = Path(cfg.data_dir), Path(cfg.policy_from), Path(cfg.reward_from)
    policy, _, _ = load_output(sft_dir)
    reference, _, _ = load_output(sft_dir)
    reward_model, reward_head, _ = load_output(rm_dir, with_head=True)
    tok = load_tokenizer(sft_dir / "tokenizer.json")
    c = dict(cfg.ppo)
    max_prompt = policy.cfg.max_seq_len - c["max_new_tokens"]
    train = PromptDataset(read_jsonl(data_dir / "prompts_train.jsonl", PROMPT_FIELDS), tok, max_prompt)
    rows = eval_subset(read_jsonl(data_dir / "prompts_val.jsonl", PROMPT_FIELDS), cfg.eval_limit)
    sft_m, sft_scores, sft_texts = heldout_eval(reference, reward_model, reward_head, tok, rows, c["max_new_tokens"])

    stage = Stage("rlhf", cfg, out_dir, inputs=[data_dir, sft_dir, rm_dir])
    module = PPOModule(policy, reference, reward_model, reward_head, optim_kwargs(cfg), c, cfg.optim.grad_clip)
    trainer = stage.trainer(gradient_clip_val=None, limit_val_batches=0)
    dl = DataLoader(train, batch_size=c["rollout_batch_size"], shuffle=True, drop_last=True,
                    collate_fn=collate_prompts)
    resumed = stage.fit(trainer, module, dl)
    rl_m, rl_scores, rl_texts = heldout_eval(policy, reward_model, reward_head, tok, rows, c["max_new_tokens"])
    wins = (rl_scores > sft_scores).float() + 0.5 * (rl_scores == sft_scores).float()
    prompts = [r["prompt"] for r in rows]
    metrics = {**{f"rlhf_{k}": v for k, v in rl_m.items()}, **{f"sft_{k}": v for k, v in sft_m.items()},
               "win_rate_vs_sft": float(wins.mean()),
               "kl_to_ref": sequence_kl(policy, reference, tok, prompts, c["max_new_tokens"], c["kl_estimator"]),
               "steps": trainer.global_step, "resumed_from_step": resumed}
    samples = out_dir / "samples.md"
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| prompt | answer | SFT | RLHF |", "|---|---|---|---|"]
    for row, s, r in list(zip(rows, sft_texts, rl_texts))[:50]:
        cells = [row["prompt"], row.get("answer", ""), s, r]
        lines.append("| " + " | ".join(x.replace("|", "\\|").replace("\n", " ") for x in cells) + " |")
    samples.write_text("\n".join(lines) + "\n")
    save_output(out_dir, policy, sft_dir / "tokenizer.json", stage.meta(metrics=metrics), head=module.value_head)
    return stage.finish(metrics, artifacts=[samples])
