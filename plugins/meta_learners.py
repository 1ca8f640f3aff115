"""Built-in meta-learners: mean, logistic regression, linear SVC, RBF SVC, dense layer.

The scikit-learn ones are fitted by scikit-learn, then their fitted parameters (coefficients,
support vectors, dual coefficients, Platt-scaling parameters) are kept as arrays and
prediction is recomputed from those arrays, so a bundle needs neither pickle nor the
estimator object. Tests check that these predictions equal scikit-learn's own.
Features are standardised first (column mean and scale stored with the learner), because
penultimate-layer activations of different members live on very different scales.
"""

from __future__ import annotations

import numpy as np

from automammo import hookimpl
from automammo.errors import BundleError
from automammo.meta import MetaLearner, MetaLearnerError, Standardizer, expand_classes, expit, softmax


class Mean(MetaLearner):
    name = "mean"
    description = "mean of the members' class probabilities (nothing fitted)"
    accepts = ("probs",)

    def _fit(self, X, y):
        if X.shape[1] % self.n_classes:
            raise MetaLearnerError(f"mean: {X.shape[1]} columns are not whole members of {self.n_classes} probabilities")

    def _predict_proba(self, X):
        return X.reshape(len(X), -1, self.n_classes).mean(axis=1)

    def _params(self):
        return {}

    def _load(self, arrays):
        pass

    def _check_loaded(self):
        super()._check_loaded()
        if self.n_features % self.n_classes:
            raise BundleError(f"mean: {self.n_features} features are not whole members of {self.n_classes} classes")


class _Standardized(MetaLearner):
    """A learner on standardised features; stores the scaler with its own parameters."""

    def _scaler_params(self):
        return {"mean": self.scaler.mean, "scale": self.scaler.scale}

    def _load_scaler(self, arrays):
        self.scaler = Standardizer(arrays["mean"], arrays["scale"])
        if self.scaler.mean.shape != (self.n_features,) or self.scaler.scale.shape != (self.n_features,):
            raise BundleError(f"meta-learner {self.name}: scaler does not match {self.n_features} features")

    def _load_classes(self, arrays):
        self.classes = np.asarray(arrays["classes"], dtype=np.int64)
        if self.classes.ndim != 1 or len(self.classes) < 2 or np.any(
                (self.classes < 0) | (self.classes >= self.n_classes)):
            raise BundleError(f"meta-learner {self.name}: stored classes {self.classes.tolist()} are invalid")


class Logistic(_Standardized):
    name = "logistic"
    description = "L2-regularised logistic regression (multinomial for 3+ classes)"
    C = 1.0

    def _fit(self, X, y):
        from sklearn.linear_model import LogisticRegression

        self.scaler = Standardizer.fit(X)
        self.estimator_ = LogisticRegression(C=self.C, max_iter=5000, random_state=self.seed).fit(self.scaler(X), y)
        self.classes = self.estimator_.classes_.astype(np.int64)
        self.coef, self.intercept = self.estimator_.coef_, self.estimator_.intercept_

    def _predict_proba(self, X):
        z = self.scaler(X) @ self.coef.T + self.intercept
        if len(self.classes) == 2:
            p1 = expit(z[:, 0])
            p = np.stack([1.0 - p1, p1], axis=1)
        else:
            p = softmax(z)
        return expand_classes(p, self.classes, self.n_classes)

    def _params(self):
        return {**self._scaler_params(), "classes": self.classes, "coef": self.coef, "intercept": self.intercept}

    def _load(self, arrays):
        self._load_scaler(arrays)
        self._load_classes(arrays)
        self.coef = np.asarray(arrays["coef"], dtype=np.float64)
        self.intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        if self.coef.shape != (rows, self.n_features) or self.intercept.shape != (rows,):
            raise BundleError(f"meta-learner {self.name}: coefficients do not match the features and classes")


class _CalibratedSVM(_Standardized):
    """An SVM whose decision values are Platt-scaled to probabilities per class.

    scikit-learn's ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` fits the
    sigmoids on cross-validated decision values and the SVM on every sample; prediction
    below repeats its arithmetic from the stored arrays.
    """

    C = 1.0

    def _svm(self, X):
        raise NotImplementedError

    def _fit(self, X, y):
        from sklearn.calibration import CalibratedClassifierCV

        self.scaler = Standardizer.fit(X)
        Xs = self.scaler(X)
        smallest = int(np.bincount(y)[np.unique(y)].min())
        folds = min(3, smallest)
        if folds < 2:
            raise MetaLearnerError(f"meta-learner {self.name} needs at least 2 samples of every class to calibrate")
        self.estimator_ = CalibratedClassifierCV(self._svm(Xs), method="sigmoid", cv=folds, ensemble=False).fit(Xs, y)
        calibrated = self.estimator_.calibrated_classifiers_[0]
        self.classes = self.estimator_.classes_.astype(np.int64)
        self._keep_svm(calibrated.estimator)
        self.a = np.array([c.a_ for c in calibrated.calibrators], dtype=np.float64)
        self.b = np.array([c.b_ for c in calibrated.calibrators], dtype=np.float64)

    def _predict_proba(self, X):
        decision = self._decision(self.scaler(X))
        if decision.ndim == 1:
            decision = decision[:, None]
        sig = expit(-(self.a * decision + self.b))
        if len(self.classes) == 2:
            p = np.stack([1.0 - sig[:, 0], sig[:, 0]], axis=1)
        else:
            total = sig.sum(axis=1, keepdims=True)
            # Every class's sigmoid at zero: scikit-learn falls back to the uniform distribution.
            p = np.divide(sig, total, out=np.full_like(sig, 1.0 / len(self.classes)), where=total != 0)
        return expand_classes(p, self.classes, self.n_classes)

    def _check_calibration(self):
        outputs = 1 if len(self.classes) == 2 else len(self.classes)
        if self.a.shape != (outputs,) or self.b.shape != (outputs,):
            raise BundleError(f"meta-learner {self.name}: calibration does not match {len(self.classes)} classes")


class LinearSVC(_CalibratedSVM):
    name = "linear_svc"
    description = "linear support-vector classifier, Platt-calibrated to probabilities"

    def _svm(self, X):
        from sklearn.svm import LinearSVC as SkLinearSVC

        return SkLinearSVC(C=self.C, max_iter=20000, random_state=self.seed)

    def _keep_svm(self, svm):
        self.coef, self.intercept = svm.coef_.astype(np.float64), svm.intercept_.astype(np.float64)

    def _decision(self, Xs):
        d = Xs @ self.coef.T + self.intercept
        return d[:, 0] if len(self.classes) == 2 else d

    def _params(self):
        return {**self._scaler_params(), "classes": self.classes, "coef": self.coef, "intercept": self.intercept,
                "a": self.a, "b": self.b}

    def _load(self, arrays):
        self._load_scaler(arrays)
        self._load_classes(arrays)
        self.coef = np.asarray(arrays["coef"], dtype=np.float64)
        self.intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        self.a, self.b = np.asarray(arrays["a"], dtype=np.float64), np.asarray(arrays["b"], dtype=np.float64)
        rows = 1 if len(self.classes) == 2 else len(self.classes)
        if self.coef.shape != (rows, self.n_features) or self.intercept.shape != (rows,):
            raise BundleError(f"meta-learner {self.name}: coefficients do not match the features and classes")
        self._check_calibration()


class RbfSVC(_CalibratedSVM):
    name = "svc"
    description = "RBF-kernel support-vector classifier, Platt-calibrated to probabilities"

    def _svm(self, X):
        from sklearn.svm import SVC

        var = X.var()
        # gamma="scale" written out, so the value used is stored with the support vectors.
        self.gamma = 1.0 / (X.shape[1] * var) if var > 0 else 1.0
        return SVC(kernel="rbf", C=self.C, gamma=self.gamma, random_state=self.seed)

    def _keep_svm(self, svm):
        self.support_vectors = svm.support_vectors_.astype(np.float64)
        self.dual_coef = svm.dual_coef_.astype(np.float64)
        self.intercept = svm.intercept_.astype(np.float64)
        self.n_support = svm.n_support_.astype(np.int64)

    def _decision(self, Xs):
        sq = (np.sum(Xs**2, axis=1)[:, None] + np.sum(self.support_vectors**2, axis=1)[None, :]
              - 2.0 * Xs @ self.support_vectors.T)
        K = np.exp(-self.gamma * np.maximum(sq, 0.0))
        if len(self.classes) == 2:
            return K @ self.dual_coef[0] + self.intercept[0]
        # One-vs-one decision values in libsvm's layout: for the pair (i, j) the support
        # vectors of class i carry their coefficients in row j-1, those of j in row i.
        starts = np.concatenate([[0], np.cumsum(self.n_support)])
        k = len(self.classes)
        ovo, p = np.empty((len(Xs), k * (k - 1) // 2)), 0
        for i in range(k):
            for j in range(i + 1, k):
                si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                ovo[:, p] = K[:, si] @ self.dual_coef[j - 1, si] + K[:, sj] @ self.dual_coef[i, sj] + self.intercept[p]
                p += 1
        return ovr_from_ovo(ovo, k)

    def _params(self):
        return {**self._scaler_params(), "classes": self.classes, "support_vectors": self.support_vectors,
                "dual_coef": self.dual_coef, "intercept": self.intercept, "n_support": self.n_support,
                "gamma": np.asarray(self.gamma), "a": self.a, "b": self.b}

    def _load(self, arrays):
        self._load_scaler(arrays)
        self._load_classes(arrays)
        self.support_vectors = np.asarray(arrays["support_vectors"], dtype=np.float64)
        self.dual_coef = np.asarray(arrays["dual_coef"], dtype=np.float64)
        self.intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        self.n_support = np.asarray(arrays["n_support"], dtype=np.int64)
        self.gamma = float(arrays["gamma"])
        self.a, self.b = np.asarray(arrays["a"], dtype=np.float64), np.asarray(arrays["b"], dtype=np.float64)
        k, n_sv = len(self.classes), len(self.support_vectors)
        if (self.support_vectors.shape != (n_sv, self.n_features) or self.dual_coef.shape != (k - 1, n_sv)
                or self.n_support.shape != (k,) or int(self.n_support.sum()) != n_sv
                or self.intercept.shape != (k * (k - 1) // 2,)):
            raise BundleError(f"meta-learner {self.name}: support vectors do not match the features and classes")
        self._check_calibration()


def ovr_from_ovo(ovo: np.ndarray, k: int) -> np.ndarray:
    """One-vs-one decision values -> scikit-learn's one-vs-rest shape (votes + confidence).

    The same transform as ``SVC(decision_function_shape="ovr")``: each class gets its votes
    plus its summed pairwise confidences squashed into (-1/3, 1/3), which breaks vote ties
    without ever overturning a vote count.
    """
    votes = np.zeros((len(ovo), k))
    confidence = np.zeros((len(ovo), k))
    p = 0
    for i in range(k):
        for j in range(i + 1, k):
            confidence[:, i] += ovo[:, p]
            confidence[:, j] -= ovo[:, p]
            votes[:, i] += ovo[:, p] >= 0
            votes[:, j] += ovo[:, p] < 0
            p += 1
    return votes + confidence / (3.0 * (np.abs(confidence) + 1.0))


class Dense(_Standardized):
    """One hidden ReLU layer with dropout and a softmax output, trained with Adam.

    Written in numpy rather than Keras: the stacking data are a few hundred rows, so a
    TensorFlow graph would cost more to build than to train, and cross-validating it with
    every fold and candidate would dominate the ensemble's time.
    """

    name = "dense"
    description = "dense layer (32 ReLU units, dropout 0.5, L2) with a softmax output"
    units, dropout, l2, epochs, learning_rate = 32, 0.5, 1e-3, 300, 1e-2

    def _fit(self, X, y):
        self.scaler = Standardizer.fit(X)
        Xs = self.scaler(X)
        rng = np.random.default_rng(self.seed)
        n, f = Xs.shape
        params = [rng.normal(0.0, np.sqrt(2.0 / f), (f, self.units)), np.zeros(self.units),
                  rng.normal(0.0, np.sqrt(1.0 / self.units), (self.units, self.n_classes)), np.zeros(self.n_classes)]
        moments = [np.zeros_like(p) for p in params]
        squares = [np.zeros_like(p) for p in params]
        target = np.eye(self.n_classes)[y]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.epochs + 1):
            w1, b1, w2, b2 = params
            pre = Xs @ w1 + b1
            keep = (rng.random(pre.shape) >= self.dropout) / (1.0 - self.dropout)
            hidden = np.maximum(pre, 0.0) * keep
            g_logits = (softmax(hidden @ w2 + b2) - target) / n
            g_pre = (g_logits @ w2.T) * keep * (pre > 0)
            grads = [Xs.T @ g_pre + self.l2 * w1, g_pre.sum(axis=0), hidden.T @ g_logits + self.l2 * w2,
                     g_logits.sum(axis=0)]
            for p, g, m, v in zip(params, grads, moments, squares):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                p -= self.learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
        self.w1, self.b1, self.w2, self.b2 = params

    def _predict_proba(self, X):
        hidden = np.maximum(self.scaler(X) @ self.w1 + self.b1, 0.0)
        return softmax(hidden @ self.w2 + self.b2)

    def _params(self):
        return {**self._scaler_params(), "w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def _load(self, arrays):
        self._load_scaler(arrays)
        self.w1, self.b1 = np.asarray(arrays["w1"], dtype=np.float64), np.asarray(arrays["b1"], dtype=np.float64)
        self.w2, self.b2 = np.asarray(arrays["w2"], dtype=np.float64), np.asarray(arrays["b2"], dtype=np.float64)
        h = self.b1.shape[0] if self.b1.ndim == 1 else -1
        if (self.w1.shape != (self.n_features, h) or self.w2.shape != (h, self.n_classes)
                or self.b2.shape != (self.n_classes,)):
            raise BundleError(f"meta-learner {self.name}: weights do not match the features and classes")


@hookimpl
def automammo_register_meta_learners():
    return [Mean, Logistic, LinearSVC, RbfSVC, Dense]
