"""Method design: the research plan schema and the stage that produces it."""
