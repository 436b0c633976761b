"""``engramlm info``: parameter accounting of a preset or config file, as JSON."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter accounting (P_tot, P_act, P_sparse, rho) as JSON")
    p.add_argument("target", nargs="?", help="preset name or config file")
    p.add_argument("--preset", dest="preset", help="preset name or config file")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engramlm.errors import ConfigError
    from engramlm.models.accounting import count_parameters
    from engramlm.models.build import resolve_config
    from engramlm.models.presets import PRESETS

    if args.list:
        print(json.dumps(sorted(PRESETS)))
        return 0
    target = args.preset or args.target
    if not target:
        raise ConfigError("info: name a preset or a config file (see --list)")
    config = resolve_config(target)
    counts = count_parameters(config)
    out = {"name": config.name, "params": counts.to_dict(), "config": config.to_dict()}
    if config.engram is not None:
        e = config.engram
        out["engram"] = {
            "layers": list(e.hash.layer_ids),
            "heads_per_layer": e.hash.heads_per_layer,
            "rows_per_layer": list(counts.engram_rows),
            "rows_per_token_per_layer": e.hash.heads_per_layer,
            "head_dim": e.head_dim,
        }
    print(json.dumps(out, indent=2))
    return 0
