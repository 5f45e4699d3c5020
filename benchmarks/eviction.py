"""Which idle connection to evict: a simulation of the hit rate, least recently used vs least used.

    python benchmarks/eviction.py

One process keeps k connections across n sites (the budget); checkouts come one at a time, each for a
site drawn from a Zipf law (weight 1/rank^s). A checkout hits when its site has a kept connection; a
miss keeps the new one and evicts another: the least recently used (LRU), or the one of the site least
used over the last `window` checkouts (what budget.ProcessBudget.pool_to_evict_from does). `top k` is the
bound: the share of checkouts for the k busiest sites. A model, not a measurement: no concurrency, and
every connection is idle between two checkouts.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque


def hit_rate(
	k: int, policy: str, s: float = 1.1, n: int = 20, checkouts: int = 200_000, window: int = 64
) -> float:
	weights = [1 / rank**s for rank in range(1, n + 1)]
	sites = random.Random(1).choices(range(n), weights=weights, k=checkouts)
	kept: OrderedDict[int, None] = OrderedDict()  # least recently used first
	recent: deque[int] = deque(maxlen=window)
	uses: Counter[int] = Counter()
	hits = 0
	for site in sites:
		if len(recent) == window:
			uses[recent[0]] -= 1
		recent.append(site)
		uses[site] += 1
		if site in kept:
			hits += 1
			kept.move_to_end(site)
			continue
		if len(kept) >= k:
			if policy == "lru":
				kept.popitem(last=False)
			else:  # least used lately; among equals the least recently used (first in `kept`)
				del kept[min(kept, key=lambda p: uses[p])]
		kept[site] = None
	return hits / checkouts


def main() -> None:
	s, n = 1.1, 20
	total = sum(1 / rank**s for rank in range(1, n + 1))
	print(f"Zipf s={s} over {n} sites: hit rate by connections kept (k)")
	print("| k | least recently used | least used lately | top k (bound) |")
	print("|---|---|---|---|")
	for k in (1, 2, 4, 8):
		top = sum(1 / rank**s for rank in range(1, k + 1)) / total
		print(f"| {k} | {hit_rate(k, 'lru'):.0%} | {hit_rate(k, 'lfu'):.0%} | {top:.0%} |")


if __name__ == "__main__":
	main()
