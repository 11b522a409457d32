"""Conveyor's processes, one package each: ingress, controller, stage (worker), kvcache."""
