"""Training one round's adapter through TRL: SFT, the preference objectives and their losses."""
