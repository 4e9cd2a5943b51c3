"""The compiler: model spec, importance priors, search strategies and the orchestrator."""
