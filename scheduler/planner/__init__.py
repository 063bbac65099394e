"""The co-location planner's inputs: what each served model asks of the fleet."""
