"""How the gradient of the last segment's loss grows on its way back through the memories of a randomly initialised
model (the Table I shape with a 4096-token vocabulary, segment 16, transformers' normal(0, 0.02) init, float32, CPU).
It explains the NaN loss of the 256K- and 1M-token benchmark steps: a growth of ~1.15x per segment overflows
within a few hundred segments, whatever the implementation.

    python benchmarks/grad_through_memory.py --out benchmarks/results/grad_through_memory_cpu.json
"""

import argparse
import json

import torch

from condensation import CondensationForCausalLM
from condensation.sizes import build_config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--segments", default="2,8,32,128,256")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    l = 16
    model = CondensationForCausalLM(build_config("table1", segment_length=l, vocab_size=4096))
    rows = []
    for n_seg in map(int, args.segments.split(",")):
        ids = torch.randint(0, 4096, (1, l * n_seg))
        model.zero_grad()
        emb = model.model.embed_tokens(ids).detach().requires_grad_()
        model(inputs_embeds=emb, labels=ids, return_logits=True).segment_losses[-1].backward()
        norms = emb.grad[0].view(n_seg, l, -1).norm(dim=(1, 2))  # [N_s]
        rows.append({"segments": n_seg, "grad_norm_first_segment": norms[0].item(),
                     "grad_norm_last_segment": norms[-1].item()})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": "table1 shape, vocab 4096, l=16, random init", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
