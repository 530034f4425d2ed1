"""The .arch grammar, shipped inside the package as nanollm.grammar."""
