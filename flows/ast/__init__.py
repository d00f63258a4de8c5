"""AST (asymmetric student-teacher, Rudolph et al., WACV 2023) for image anomaly detection: the model side.

``features`` holds the frozen pretrained extractor, ``positional`` the 2-D encoding, ``teacher`` the
normalizing flow, ``student`` the conv regressor and ``model`` the bundle with maps and image scores.
No training loop lives here.
"""

from flows.ast.features import FeatureExtractor, FeatureExtractorConfig, frames_to_tensor
from flows.ast.model import AST, ASTConfig
from flows.ast.positional import positional_encoding_2d
from flows.ast.student import Student
from flows.ast.teacher import Teacher

__all__ = [
    "AST",
    "ASTConfig",
    "FeatureExtractor",
    "FeatureExtractorConfig",
    "Student",
    "Teacher",
    "frames_to_tensor",
    "positional_encoding_2d",
]
