"""Knowledge base of method and design-principle cards, and retrieval over it."""
