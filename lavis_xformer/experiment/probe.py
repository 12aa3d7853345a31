"""The readout: a fixed linear probe (scikit-learn's ``RidgeClassifier``: least squares on the one-hot answers with an
L2 penalty, closed form, the same ``alpha`` for every arm) per question and target ("how many circles", "where is the red square", ...) on the standardised frozen visual output, fit on the
training split's questions and scored on the fresh test split's; and the image-blind baseline from the training
split alone."""

from collections import Counter, defaultdict
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lavis_xformer.datasets.shapes import QUESTION_TYPES

Question = Tuple[int, str, str, str]  # (image index, question type, target, answer)


def _by_target(questions: Sequence[Question]) -> Dict[Tuple[str, str], List[Question]]:
    groups = defaultdict(list)
    for question in questions:
        groups[(question[1], question[2])].append(question)
    return groups


def probe_accuracies(train_x: np.ndarray, train_questions: Sequence[Question], test_x: np.ndarray,
                     test_questions: Sequence[Question], alpha: float = 10.0) -> Dict[str, float]:
    """Percent correct per question type on ``test_questions``: one ridge classifier per (type, target), fit on the
    rows of ``train_x`` its training questions point to (features standardised on ``train_x``).

    Closed form rather than logistic regression's iterations: no convergence budget to differ between arms, and
    about 50x less CPU at the experiment's size (a choice; the issue names either)."""
    from sklearn.linear_model import RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    train_groups, correct = _by_target(train_questions), Counter()
    for (qtype, target), questions in sorted(_by_target(test_questions).items()):
        rows = np.array([q[0] for q in questions])
        truth = np.array([q[3] for q in questions])
        fit_on = train_groups.get((qtype, target), [])
        answers = sorted({q[3] for q in fit_on})
        if len(answers) < 2:  # one answer (or none) in training: the probe can only say it
            predicted = np.full(len(rows), answers[0] if answers else QUESTION_TYPES[qtype][0])
        else:
            probe = RidgeClassifier(alpha=alpha).fit(train_x[[q[0] for q in fit_on]], [q[3] for q in fit_on])
            predicted = probe.predict(test_x[rows])
        correct[qtype] += int((predicted == truth).sum())
    totals = Counter(q[1] for q in test_questions)
    return {qtype: 100.0 * correct[qtype] / totals[qtype] for qtype in QUESTION_TYPES if totals[qtype]}


def blind_baseline(train_questions: Sequence[Question], test_questions: Sequence[Question]) -> Dict[str, float]:
    """Percent correct per type of the best image-blind answer: the training split's most frequent answer to each
    question (type and target; ties to the answer listed first), scored on the test split."""
    order = {qtype: {a: i for i, a in enumerate(answers)} for qtype, answers in QUESTION_TYPES.items()}
    guess = {}
    for (qtype, target), questions in _by_target(train_questions).items():
        counts = Counter(q[3] for q in questions)
        guess[(qtype, target)] = min(counts, key=lambda a: (-counts[a], order[qtype][a]))
    correct, totals = Counter(), Counter()
    for _, qtype, target, answer in test_questions:
        totals[qtype] += 1
        correct[qtype] += guess.get((qtype, target), QUESTION_TYPES[qtype][0]) == answer
    return {qtype: 100.0 * correct[qtype] / totals[qtype] for qtype in QUESTION_TYPES if totals[qtype]}
