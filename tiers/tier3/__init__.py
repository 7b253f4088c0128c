"""Tier 3: one model across several machines.

    every machine:  `tierkit agent`   agent/        advertises itself, serves its profile, starts engine workers
    the head:       `tierkit serve`   serve.py      peers -> placement.py -> the engine's launch (engines.py)
                                                    through client.py -> the engine -> server.py (OpenAI API)
    B17             b17_two_node.py                 the same, measured: one node against two
"""
