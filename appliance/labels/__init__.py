"""Report label extraction (vocabularies now; extractors arrive with the labels stage)."""
