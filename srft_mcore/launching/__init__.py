"""Launching: process groups and seeding, local multi-rank spawn, multi-node helpers, CPU adaptation."""
