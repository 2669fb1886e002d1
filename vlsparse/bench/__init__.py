"""vlsparse bench: accuracy, latency, memory and size of a run's levels in every format, with reports and plots."""
