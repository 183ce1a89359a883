"""Finding vocabularies shipped with the appliance."""

# CT-RATE's 18 abnormalities, in the dataset's own order (RECIPES.md section 1).
CT_RATE_18: tuple[str, ...] = (
    "medical material",
    "arterial wall calcification",
    "cardiomegaly",
    "pericardial effusion",
    "coronary artery wall calcification",
    "hiatal hernia",
    "lymphadenopathy",
    "emphysema",
    "atelectasis",
    "lung nodule",
    "lung opacity",
    "pulmonary fibrotic sequela",
    "pleural effusion",
    "mosaic attenuation pattern",
    "peribronchial thickening",
    "consolidation",
    "bronchiectasis",
    "interlobular septal thickening",
)
