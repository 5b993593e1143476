"""The benchmarks behind `tandem bench ...` (ratios measured side by side in one run), the link
simulator they put between device and gateway, the helpers that launch gateway processes, plots."""
