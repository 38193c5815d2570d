"""MedVLSAM2 — the 3D Slicer module: report, VQA chat and prompt-driven segmentation of the selected CT.

Slicer glue only: no model code lives here. Top-level imports are stdlib and Slicer toolkits; the library
(``MedVLSAM2Lib``) and the Qt-free node logic (``MedVLSAM2Core.SceneLogic``) are imported inside methods, after
the user has installed the dependencies with the *Install dependencies* button. The Widget is thin: it reads
the panels, hands nodes to the Logic, and runs the backend call on a worker thread (progress, Cancel) while
every MRML read and write stays on the main thread.
"""

import html
import importlib
import importlib.util
import logging
import os
import queue
import sys
import threading

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_SLICER = (5, 10)  # Python 3.12 in Slicer; MedVLSAM2Lib needs Python 3.10+
ANSWER_KINDS = [("Short answer", "short"), ("Long answer", "long"), ("Multiple choice", "choice")]


def slicerTooOld():
    """A message for a Slicer older than :data:`MINIMUM_SLICER`, else ``None``."""
    have = (slicer.app.majorVersion, slicer.app.minorVersion)
    if have >= MINIMUM_SLICER:
        return None
    return (f"MedVLSAM2 needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later (Python 3.10+); this is "
            f"Slicer {have[0]}.{have[1]} with Python {sys.version.split()[0]}. Install a newer Slicer.")  # fmt: skip


def addLibraryPath():
    """Installed, MedVLSAM2Lib sits beside this file; in a source checkout (the module folder added to Slicer's
    module paths) it sits one folder up: put that folder on sys.path so the module finds it."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("MedVLSAM2Lib") is None and os.path.isfile(
        os.path.join(checkout, "MedVLSAM2Lib", "__init__.py")
    ):
        sys.path.insert(0, checkout)


class Cancelled(Exception):
    """Raised inside a running job when the user pressed Cancel."""


class MedVLSAM2(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        addLibraryPath()
        self.parent.title = "MedVLSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedVLSAM2 developers"]
        self.parent.helpText = (
            "MedVL-SAM2 reads CT volumes: radiology report generation, VQA chat, and segmentation from a "
            "structure name, a free-text description, points and a box (ROI). Runs locally (GPU recommended) "
            "or on a remote MedVLSAM2 server."
        )
        tooOld = slicerTooOld()
        if tooOld:
            logging.error(tooOld)
            self.parent.helpText = f"{tooOld}\n\n{self.parent.helpText}"
        self.parent.acknowledgementText = (
            "Builds on M3D-CLIP, InternVL2.5, SAM2 and 3D Slicer. Test data courtesy of TotalSegmentator, "
            "dcmqi and slicerio."
        )


class MedVLSAM2Logic(ScriptedLoadableModuleLogic):
    """Backend setup and the node work (delegated to ``MedVLSAM2Core.SceneLogic``); usable without the Widget."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = None

    @property
    def scene(self):
        """The Qt-free node logic (created on first use, after the dependencies are installed)."""
        if self._scene is None:
            from MedVLSAM2Core import SceneLogic

            self._scene = SceneLogic()
        return self._scene

    @staticmethod
    def installPlan(remote):
        """What the chosen backend still needs (``MedVLSAM2Core.dependencies``; versions read without importing)."""
        from MedVLSAM2Core.dependencies import install_plan, installed_versions

        return install_plan(installed_versions(), remote)

    @staticmethod
    def installDependencies(remote):
        """Install what the backend needs (called only after the user confirmed), by SlicerTotalSegmentator's rules:
        torch from the PyTorch extension with a version floor, Slicer's own packages pinned by a constraints file
        and never installed, sam2 without CUDA and without dependencies."""
        import tempfile

        plan = MedVLSAM2Logic.installPlan(remote)
        if plan.problem:
            raise RuntimeError(plan.problem)
        if plan.torch:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise RuntimeError("MedVLSAM2 needs the PyTorch extension: install it from the Extensions Manager, "
                                   "restart Slicer, then click Install dependencies again.") from error  # fmt: skip
            version = plan.torch.removeprefix("torch")
            if (
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version)
                is None
            ):
                raise RuntimeError("PyTorch was not installed; MedVLSAM2 needs it to run locally.")
            plan = MedVLSAM2Logic.installPlan(remote)  # pin the torch that was just installed
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w") as handle:
                handle.write("\n".join(plan.constraints) + "\n")
            if plan.pip:
                slicer.util.pip_install(["-c", constraints, *plan.pip])
            if plan.sam2:
                from MedVLSAM2Core.dependencies import SAM2_REQUIREMENT

                os.environ["SAM2_BUILD_CUDA"] = "0"  # Python-only sam2: no CUDA extension to compile
                slicer.util.pip_install(["--no-deps", "--no-build-isolation", "-c", constraints, SAM2_REQUIREMENT])
        importlib.invalidate_caches()

    def loadLocal(self, weights, device):
        """Load the model from a weights folder (or a preset name) onto ``device`` and use it; returns its facts."""
        self.scene.backend = self.createLocal(weights, device)
        return self.scene.backend.describe()

    @staticmethod
    def createLocal(weights, device):
        """An InferenceEngine over a weights folder (or a preset name) on ``device`` (auto, cuda, cpu)."""
        import torch

        from MedVLSAM2Lib.engine import InferenceEngine

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
        return InferenceEngine.load(weights, device=device, dtype=dtype)

    @staticmethod
    def createRemote(url, apiKey):
        """A client of a MedVLSAM2 server, checked by asking its capabilities; the key stays in memory only."""
        from MedVLSAM2Lib.serving.client import ServerClient

        client = ServerClient(url, apiKey or None)
        client.describe()
        return client

    @property
    def serverUrl(self):
        """The server's URL when the backend is remote, else ``None``."""
        return getattr(self.scene.backend, "url", None)


class MedVLSAM2Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panels: Setup, Input, Report, Chat, Segment; long work on a worker thread with progress and Cancel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._job = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        tooOld = slicerTooOld()
        if tooOld:
            self.layout.addWidget(qt.QLabel(tooOld))
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedVLSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedVLSAM2Logic()
        self.history = []
        self.uploadConsent = set()
        for name in ("auto", "cuda", "cpu"):
            self.ui.deviceCombo.addItem(name)
        for text, kind in ANSWER_KINDS:
            self.ui.answerKindCombo.addItem(text, kind)
        self.ui.localRadio.toggled.connect(self.updateSetup)
        self.ui.installButton.clicked.connect(self.onInstall)
        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.reportButton.clicked.connect(self.onReport)
        self.ui.copyReportButton.clicked.connect(self.onCopyReport)
        self.ui.saveReportButton.clicked.connect(self.onSaveReport)
        self.ui.askButton.clicked.connect(self.onAsk)
        self.ui.questionEdit.returnPressed.connect(self.onAsk)
        self.ui.clearChatButton.clicked.connect(self.onClearChat)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.refineButton.clicked.connect(lambda: self.onSegment(refine=True))
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.updateSegments)
        self.ui.volumeSelector.currentNodeChanged.connect(lambda _: self.onClearChat())  # history is per volume
        self.ui.positivePointsSelector.currentNodeChanged.connect(self.onPositivePoints)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addCompletion()
        self.updateSetup()

    def cleanup(self):
        """The module is closed or Slicer quits: stop the poll timer and cancel a running job (its worker stops at
        its next progress step; its result is dropped)."""
        self.removeObservers()
        if self._job is not None:
            self._job["cancel"].set()
            self._job["timer"].stop()
            self._job = None

    def onSceneEndClose(self, caller, event):
        """A closed scene takes its patient with it: the chat, the report and every upload consent are reset."""
        self.onClearChat()
        self.ui.reportText.clear()
        self.uploadConsent.clear()

    def addCompletion(self):
        """Complete structure names in the Segment prompt from the terminology table (numpy-free import)."""
        from MedVLSAM2Lib.terminology import structure_names

        completer = qt.QCompleter(structure_names(), self.ui.segmentTextEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.segmentTextEdit.setCompleter(completer)

    # ------------------------------------------------------------------ setup

    def updateSetup(self):
        local = self.ui.localRadio.checked
        for widget in (self.ui.weightsPathEdit, self.ui.deviceCombo):
            widget.enabled = local
        for widget in (self.ui.serverUrlEdit, self.ui.apiKeyEdit):
            widget.enabled = not local
        plan = MedVLSAM2Logic.installPlan(remote=not local)
        self.ui.installButton.enabled = not plan.empty
        if plan.problem:
            self.ui.backendStatusLabel.text = plan.problem
        elif not plan.empty:
            self.ui.backendStatusLabel.text = f"missing: {', '.join(plan.missing())} (click Install dependencies)"
        elif self.logic.scene.backend is None:
            self.ui.backendStatusLabel.text = "dependencies present; load the model or connect"

    def onInstall(self):
        remote = not self.ui.localRadio.checked
        what = "the client packages" if remote else "PyTorch (via the PyTorch extension) and the model's packages"
        if not slicer.util.confirmOkCancelDisplay(f"MedVLSAM2 will install {what} into Slicer's Python. "
                                                  "This can take several minutes. Continue?"):  # fmt: skip
            return
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            MedVLSAM2Logic.installDependencies(remote)
            self.ui.backendStatusLabel.text = "dependencies installed"
        self.updateSetup()

    def onConnect(self):
        if self.ui.localRadio.checked:
            weights = self.ui.weightsPathEdit.currentPath
            device = self.ui.deviceCombo.currentText
            self.run("Loading the model", lambda _: MedVLSAM2Logic.createLocal(weights, device), self.onBackendReady)
        else:
            url, key = self.ui.serverUrlEdit.text, self.ui.apiKeyEdit.text
            self.run("Connecting", lambda _: MedVLSAM2Logic.createRemote(url, key), self.onBackendReady)

    def onBackendReady(self, backend):
        """Runs on the main thread once loading or connecting succeeded (a cancelled one never gets here)."""
        self.logic.scene.backend = backend
        description = backend.describe()
        self.ui.backendStatusLabel.text = ", ".join(f"{k}: {v}" for k, v in description.items()
                                                     if k in ("preset", "device", "dtype", "server"))  # fmt: skip

    def consentToUpload(self, volumeNode):
        """Ask once per volume before its voxels leave this computer for a remote server."""
        server = self.logic.serverUrl
        if server is None or (server, volumeNode.GetID()) in self.uploadConsent:
            return True
        if slicer.util.confirmYesNoDisplay(f"Send the voxels of '{volumeNode.GetName()}' to the server "
                                           f"{server}? Only do this if the server may "
                                           "receive this patient's data."):  # fmt: skip
            self.uploadConsent.add((server, volumeNode.GetID()))
            return True
        return False

    # ------------------------------------------------------------------ running work off the UI thread

    def run(self, title, work, done):
        """Run ``work(progress)`` on a worker thread; ``done(result)`` runs on the main thread. ``progress(text)``
        streams text into the panel and raises :class:`Cancelled` after Cancel."""
        if self._job is not None:
            slicer.util.errorDisplay("MedVLSAM2 is still busy; wait or press Cancel.")
            return
        messages, cancel = queue.Queue(), threading.Event()

        def progress(text):
            if cancel.is_set():
                raise Cancelled()
            messages.put(("progress", text))

        def target():
            try:
                messages.put(("done", work(progress)))
            except Cancelled:
                messages.put(("cancelled", None))
            except Exception as err:  # shown to the user as one message, logged with its traceback
                logging.exception("MedVLSAM2: %s failed", title)
                messages.put(("error", err))

        timer = qt.QTimer()
        self._job = {"cancel": cancel, "timer": timer, "done": done, "messages": messages, "title": title}
        self.ui.statusLabel.text = f"{title}…"
        self.ui.progressBar.setRange(0, 0)
        self.ui.cancelButton.enabled = True
        timer.timeout.connect(self.poll)
        timer.start(100)
        threading.Thread(target=target, daemon=True, name="MedVLSAM2 job").start()

    def poll(self):
        job = self._job
        while not job["messages"].empty():
            kind, value = job["messages"].get()
            if kind == "progress":
                self.onProgress(value)
                continue
            job["timer"].stop()
            self._job = None
            if kind == "done" and job["cancel"].is_set():
                kind = "cancelled"  # finished while cancelling: its result is dropped, nothing is written
            self.ui.progressBar.setRange(0, 1)
            self.ui.progressBar.value = 1 if kind == "done" else 0
            self.ui.cancelButton.enabled = False
            self.ui.statusLabel.text = {"done": f"{job['title']}: done", "cancelled": f"{job['title']}: cancelled",
                                        "error": f"{job['title']}: failed"}[kind]  # fmt: skip
            if kind == "done":
                with slicer.util.tryWithErrorDisplay(f"{job['title']} failed."):
                    job["done"](value)
            elif kind == "error":
                slicer.util.errorDisplay(f"{job['title']} failed: {value}")
            return

    def onProgress(self, text):
        self.ui.reportText.moveCursor(qt.QTextCursor.End)  # append, whatever the user selected meanwhile
        self.ui.reportText.insertPlainText(text)

    def onCancel(self):
        if self._job is not None:
            self._job["cancel"].set()
            self.ui.statusLabel.text = f"{self._job['title']}: cancelling…"

    # ------------------------------------------------------------------ panels

    def _volume(self):
        volumeNode = self.ui.volumeSelector.currentNode()
        if volumeNode is None:
            slicer.util.errorDisplay("Select a CT volume in Input first.")
            return None
        return volumeNode if self.consentToUpload(volumeNode) else None

    def _inputs(self, volumeNode, what):
        """``(volume, backend)`` for a job, or ``None`` after telling the user what is missing."""
        from MedVLSAM2Lib.errors import MedVLSAM2Error

        try:
            return self.logic.scene.volumeFromNode(volumeNode), self.logic.scene.requireBackend()
        except MedVLSAM2Error as err:
            slicer.util.errorDisplay(f"{what}: {err}")
            return None

    def onReport(self):
        volumeNode = self._volume()
        if volumeNode is None:
            return
        scene, inputs = self.logic.scene, self._inputs(volumeNode, "Cannot generate a report")
        if inputs is None or self._job is not None:
            return
        volume, backend = inputs
        self.ui.reportText.clear()

        def work(progress):
            return backend.report(backend.encode(volume, scene.intensity), on_token=progress)

        self.run("Generating the report", work, lambda report: self.ui.reportText.setPlainText(report.text))

    def onCopyReport(self):
        qt.QApplication.clipboard().setText(self.ui.reportText.toPlainText())

    def onSaveReport(self):
        path = qt.QFileDialog.getSaveFileName(None, "Save report", "report.txt", "Text (*.txt)")
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(self.ui.reportText.toPlainText())

    def onAsk(self):
        volumeNode, question = self._volume(), self.ui.questionEdit.text.strip()
        if volumeNode is None or not question:
            return
        kind, scene, history = self.ui.answerKindCombo.currentData, self.logic.scene, list(self.history)
        inputs = self._inputs(volumeNode, "Cannot ask")
        if inputs is None:
            return
        volume, backend = inputs

        def done(answer):
            self.history.append((question, answer.text))
            self.ui.chatHistory.append(f"<b>You:</b> {html.escape(question)}<br><b>MedVLSAM2:</b> "
                                       f"{html.escape(answer.text)}")  # fmt: skip
            self.ui.questionEdit.clear()

        def work(_):
            return backend.ask(backend.encode(volume, scene.intensity), question, history=history, kind=kind)

        self.run("Answering", work, done)

    def onClearChat(self):
        self.history = []
        self.ui.chatHistory.clear()

    def onPositivePoints(self, node):
        """A new point list starts with positive points: Slicer's place mode goes to it."""
        if node is not None:
            slicer.modules.markups.logic().SetActiveList(node)

    def updateSegments(self, node=None):
        self.ui.segmentCombo.clear()
        node = node or self.ui.segmentationSelector.currentNode()
        if node is None:
            return
        segmentation = node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            score = self.logic.scene.segmentScore(segment)
            text = f"{segment.GetName()} (confidence {score})" if score else segment.GetName()
            self.ui.segmentCombo.addItem(text, segmentation.GetNthSegmentID(n))

    def onSegment(self, refine=False):
        volumeNode = self._volume()
        if volumeNode is None:
            return
        segmentationNode = self.ui.segmentationSelector.currentNode()  # None: made once there is a mask
        segmentId = self.ui.segmentCombo.currentData if refine else None
        if refine and not segmentId:
            slicer.util.errorDisplay("Choose the segment to refine first.")
            return
        scene = self.logic.scene
        with slicer.util.tryWithErrorDisplay("Segmentation failed."):
            request = scene.segmentRequest(
                volumeNode, self.ui.segmentTextEdit.text, self.ui.positivePointsSelector.currentNode(),
                self.ui.negativePointsSelector.currentNode(), self.ui.roiSelector.currentNode())  # fmt: skip
            volume = request.pop("volume")

            title = "Segmenting"

            def done(result):
                node = scene.outputSegmentation(segmentationNode, volumeNode)
                self.ui.segmentationSelector.setCurrentNode(node)
                scene.writeResult(result, node, volumeNode, segmentId)
                if result.message:  # the mask came from the points or box alone
                    self.ui.statusLabel.text = f"{title}: done. {result.message}"
                self.updateSegments()
                self.onPositivePoints(self.ui.positivePointsSelector.currentNode())  # next click: positive

            self.run(title, lambda _: scene.runSegment(volume, **request), done)

    def onUndo(self):
        if not self.logic.scene.undo():
            self.ui.statusLabel.text = "nothing to undo"
        self.updateSegments()
