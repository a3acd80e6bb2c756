"""Operations: the policy file, the agent that carries it out, job history, status,
metrics and alerts.

Layering: the agent is a service; it reaches the pool through
`service.runner.call` / `service.snapshots` and repositories through `backup`.
Its pure parts (policy parsing, windows, the scheduler, the status report) take
the clock and history as arguments, so tests drive them with a simulated clock.
"""
