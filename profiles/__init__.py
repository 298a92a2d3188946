"""Head profiles: probes → per-(layer, head) visual scores → versioned HeadProfile files."""
