"""Pure logic of promptfleet: no Ray, no I/O of its own; tested without a cluster."""
