"""The papers' protocol as one command: plan every stage-1 and stage-2 job, run them (one
machine or SLURM), follow them, and tabulate test scores of dev-selected prompts.

    python -m dtvg_ds.protocol plan protocols/demo.yaml --out runs/demo_protocol
    python -m dtvg_ds.protocol run runs/demo_protocol --executor local|slurm
    python -m dtvg_ds.protocol status runs/demo_protocol
    python -m dtvg_ds.protocol table runs/demo_protocol

Layers: `spec` reads and checks a protocol file; `graph` turns it into jobs (flags, output
dirs, dependencies; pure, no I/O besides writing plan.json); `state` says what a job's output
dir holds (done and verified, stale, partial); `executors` launch jobs; `table` reads scores.
"""
