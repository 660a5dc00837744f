"""`ReftConfig`: the one description of an adapter (what the wrapper builds, adapter_config.json stores,
recipes produce).

An adapter is a set of sites, each with one intervention (tied, or a one-sided spec) or a (prefix,
suffix) pair, named by its registered name and constructor arguments; the positions each site edits;
whether two-sided sites are tied; the base-model modules trained beside it (`head`); and an optional
cap on the norm of each token's edit. No weights: `build(model)` makes fresh interventions from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from ._errors import short
from .interventions.base import Intervention, intervention_class
from .positions import PositionSpec

if TYPE_CHECKING:
    from torch import nn

    from .sites import Site


@dataclass
class ReftConfig:
    """An adapter: interventions at sites and the positions they edit.

    Args:
        sites: `{site: intervention}`. An intervention is a registered name (`"loreft"`), a dict with
            its `"name"` and constructor arguments (`{"name": "loreft", "rank": 4}`; `hidden_size` is
            filled in from the site when left out), or a `[prefix, suffix]` list of two such for an
            untied two-sided site.
        positions: one spec for every site (`"all"`, `"f7+l7"`, `"l1"`, ...), or `{site: spec}`.
        tied: one intervention for a site's first and last positions (default), or one each.
        head: module paths of the base model trained with the adapter (e.g. `["classifier"]`).
        max_norm: cap on each token's edit `‖h' − h‖₂` (BREP, 2025); None: no cap.

    Example:
        >>> config = ReftConfig({"layers.15.block_output": {"name": "loreft", "rank": 4}}, positions="l1")
        >>> rm = reft.get_reft_model(model, config)
    """

    sites: Mapping[str, Any]
    positions: str | PositionSpec | Mapping[str, str | PositionSpec] = "all"
    tied: bool = True
    head: list[str] | str | None = field(default_factory=list)
    max_norm: float | None = None

    def __post_init__(self):
        if not isinstance(self.sites, Mapping) or not self.sites:
            raise ValueError(f"ReftConfig.sites must be a non-empty {{site: intervention}} dict, got {short(self.sites)}")
        if not isinstance(self.tied, bool):
            raise ValueError(f"ReftConfig.tied must be True or False, got {short(self.tied)}")
        if self.max_norm is not None and not (
            isinstance(self.max_norm, (int, float)) and not isinstance(self.max_norm, bool) and 0 < self.max_norm < float("inf")
        ):
            raise ValueError(f"ReftConfig.max_norm must be a positive finite number or None, got {short(self.max_norm)}")
        head = [self.head] if isinstance(self.head, str) else list(self.head or [])
        if not all(isinstance(h, str) and h for h in head):
            raise ValueError(f"ReftConfig.head must be module paths (str), got {short(self.head)}")
        self.head = head
        for site in self.sites:
            if not isinstance(site, str) or not 0 < len(site) <= 1000:
                raise ValueError(f"ReftConfig.sites: a site must be a str of 1..1000 characters, got {short(site)}")
        self.positions = _site_specs(self.positions, list(self.sites))
        self.sites = {site: _entries(site, value, PositionSpec.parse(self.positions[site]), self.tied) for site, value in self.sites.items()}

    # ------------------------------------------------------------------ building
    def build(self, model: "nn.Module") -> dict[str, list[Intervention]]:
        """Fresh interventions for every site of `model`: `{site: [intervention]}` (two when untied).

        Hidden sizes are filled in from each site and checked against it, and ranks against the hidden
        size, before anything is allocated.
        """
        from .sites import resolve_site

        resolved = {site: resolve_site(model, site) for site in self.sites}
        largest = None  # the largest dimension of the model: the bound for sites whose size needs a forward pass
        if any(r.hidden_size is None for r in resolved.values()):
            largest = max((max(p.shape, default=1) for p in model.parameters()), default=1)
        return {site: [_build(site, e, resolved[site], largest) for e in entries] for site, entries in self.sites.items()}

    def resolved(self, model: "nn.Module") -> "ReftConfig":
        """This config with every `hidden_size` filled in from `model`'s sites."""
        from .sites import resolve_site

        sites = {}
        for site, entries in self.sites.items():
            size = resolve_site(model, site).hidden_size
            sites[site] = [
                {"name": e["name"], **({"hidden_size": size} if size is not None and "hidden_size" not in e["config"] else {}), **e["config"]}
                for e in entries
            ]
        return ReftConfig(sites, positions=dict(self.positions), tied=self.tied, head=list(self.head), max_norm=self.max_norm)

    @classmethod
    def of(cls, interventions: Mapping[str, Any], positions: Any = "all", tied: bool = True, head: Any = None,
           max_norm: float | None = None) -> "ReftConfig":
        """The config describing `{site: Intervention or (prefix, suffix)}` instances (their names and arguments)."""
        sites = {}
        for site, value in interventions.items():
            ivs = list(value) if isinstance(value, (tuple, list)) else [value]
            for iv in ivs:
                if not isinstance(iv, Intervention):
                    from .interventions.base import registered_interventions

                    raise TypeError(
                        f"site {site!r}: expected a reft.Intervention (registered: {', '.join(registered_interventions())}), "
                        f"got {type(iv).__name__}"
                    )
            sites[site] = [{"name": iv.name or type(iv).__name__, **iv.config} for iv in ivs]
        return cls(sites, positions=positions, tied=tied, head=head, max_norm=max_norm)

    # ------------------------------------------------------------------ on disk
    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json fields that describe the adapter (JSON values only)."""
        sites = []
        for site, entries in self.sites.items():
            for e in entries:
                try:
                    json.dumps(e["config"], allow_nan=False)
                except (TypeError, ValueError) as err:
                    raise ValueError(
                        f"site {site!r}: {e['name']} config {short(e['config'])} is not JSON ({err}); constructor "
                        "arguments of a saved intervention must be numbers, strings, booleans, None, lists or dicts"
                    ) from None
            sites.append({
                "site": site,
                "positions": self.positions[site],
                "tied": self.tied or len(entries) == 1,
                "interventions": [{"name": e["name"], "config": dict(e["config"])} for e in entries],
            })
        out = {"tied": self.tied, "sites": sites, "head": list(self.head)}
        if self.max_norm is not None:
            out["max_norm"] = self.max_norm
        return out

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], where: str = "adapter config") -> "ReftConfig":
        """Parse the fields written by `to_dict` (an adapter_config.json), with errors naming `where`."""
        sites, head = config.get("sites"), config.get("head", [])
        if not isinstance(sites, list) or not sites:
            raise ValueError(f"{where}: 'sites' must be a non-empty list of sites, got {short(sites)}")
        if not isinstance(head, list) or not all(isinstance(h, str) for h in head):
            raise ValueError(f"{where}: 'head' must be a list of module paths, got {short(head)}")
        parsed, positions = {}, {}
        for s in sites:
            ok = (
                isinstance(s, dict)
                and isinstance(s.get("site"), str)
                and isinstance(s.get("positions"), str)
                and isinstance(s.get("interventions"), list)
                and len(s["interventions"]) in (1, 2)
                and all(isinstance(iv, dict) and isinstance(iv.get("name"), str) and isinstance(iv.get("config"), dict)
                        for iv in s["interventions"])
            )
            if not ok:
                raise ValueError(
                    f"{where}: malformed site entry {short(s)}; expected {{'site': str, 'positions': str, "
                    "'tied': bool, 'interventions': [{'name': str, 'config': {...}}] (1 or 2 of them)}"
                )
            if s["site"] in parsed:
                raise ValueError(f"{where}: site {s['site']!r} appears twice")
            parsed[s["site"]] = [{"name": iv["name"], **iv["config"]} for iv in s["interventions"]]
            positions[s["site"]] = s["positions"]
        untied = [site for site, e in parsed.items() if len(e) == 2]
        tied = config.get("tied", not untied)
        if not isinstance(tied, bool):
            raise ValueError(f"{where}: 'tied' must be true or false, got {short(tied)}")
        try:
            return cls(parsed, positions=positions, tied=tied and not untied, head=head, max_norm=config.get("max_norm"))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def __repr__(self) -> str:
        parts = [f"{site} [{self.positions[site]}]: " + " | ".join(_describe(e) for e in entries) for site, entries in self.sites.items()]
        extra = "".join(
            f", {k}={v!r}" for k, v in (("tied", self.tied), ("head", self.head), ("max_norm", self.max_norm))
            if v not in (True, [], None) or (k == "tied" and v is False)
        )
        return f"ReftConfig({len(self.sites)} sites{extra}:\n  " + "\n  ".join(parts) + "\n)"


def _describe(entry: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in entry["config"].items())
    return f"{entry['name']}({args})"


def _site_specs(positions: Any, sites: list[str]) -> dict[str, str]:
    if not isinstance(positions, Mapping):
        spec = str(PositionSpec.parse(positions))
        return {site: spec for site in sites}
    missing = [site for site in sites if site not in positions]
    extra = [site for site in positions if site not in sites]
    if missing or extra:
        raise ValueError(f"positions dict must name exactly the intervention sites; missing {missing}, unknown {extra}")
    return {site: str(PositionSpec.parse(spec)) for site, spec in positions.items()}


def _entry(site: str, value: Any) -> dict:
    """`"loreft"` or `{"name": "loreft", **args}` -> `{"name": ..., "config": {args}}`."""
    if isinstance(value, str):
        return {"name": value, "config": {}}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return {"name": value["name"], "config": {k: v for k, v in value.items() if k != "name"}}
    raise ValueError(
        f"site {site!r}: an intervention is a registered name or a dict {{'name': ..., **arguments}}, got {short(value)}"
    )


def _entries(site: str, value: Any, spec: PositionSpec, tied: bool) -> list[dict]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    entries = [_entry(site, v) for v in values]
    if tied or not spec.two_sided:
        if len(entries) != 1:
            raise ValueError(f"site {site!r}: a pair of interventions needs tied=False and a spec 'f<n>+l<m>'")
        return entries
    if len(entries) == 1:  # untied: a second, separately initialised intervention for the suffix
        entries.append({"name": entries[0]["name"], "config": dict(entries[0]["config"])})
    if len(entries) != 2:
        raise ValueError(f"site {site!r}: untied sites take one intervention or a (prefix, suffix) pair, got {len(entries)}")
    return entries


def _build(site: str, entry: dict, resolved: "Site", largest: int | None) -> Intervention:
    """Build one intervention, its sizes checked against the site before its weights are allocated."""
    cls = intervention_class(entry["name"])
    config = dict(entry["config"])
    size = resolved.hidden_size
    if "hidden_size" not in config:
        if size is None:
            raise ValueError(f"site {site!r}: give the intervention's hidden_size (the site's size is known only from a forward pass)")
        config["hidden_size"] = size
    given = config["hidden_size"]
    if not isinstance(given, int) or isinstance(given, bool) or given < 1 or (size is not None and given != size):
        raise ValueError(
            f"site {site!r}: {entry['name']} has hidden_size {short(given)}, but the site's hidden size is {size}"
        )
    if size is None and largest is not None and given > largest:
        raise ValueError(
            f"site {site!r}: {entry['name']} has hidden_size {given}, larger than any dimension of the base model "
            f"(the largest is {largest})"
        )
    rank = config.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= given):
        raise ValueError(f"site {site!r}: {entry['name']} rank must be an int in 1..{given} (the hidden size), got {short(rank)}")
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"site {site!r}: cannot build {entry['name']!r} from {short(config)}: {e}") from None
