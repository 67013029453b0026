"""Module 4: data cleaning — a cross-encoder judges whether a value (or a type) is misassigned."""
