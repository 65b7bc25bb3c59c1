"""Direct preference optimisation: sigmoid DPO, IPO and conservative DPO against a frozen reference."""
