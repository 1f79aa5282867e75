"""Pipeline factories and their launchers (batch/backfill now; streaming and training later)."""
